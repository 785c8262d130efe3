// SP's per-row pass over the [b, b] Gram matrices (math: csrc/sp.cpp). Rows
// are worked in double vectors (float rows converted once), G = A / den in the
// compute type, as the reference rounds it.
#include <cmath>
#include <vector>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
namespace {

using Vd = Vectorized<double>;
constexpr int64_t Wd = Vd::size();
constexpr double kSpEps = 1e-12;

double hsum(const Vd& v) {
  double s = 0.0;
  add_lanes(s, v);
  return s;
}

// ||a||_1 or ||a||_2 of a double row, rounded to the compute type A.
template <typename A>
double row_norm(const double* a, int64_t b, bool l1) {
  Vd acc(0.0);
  for (int64_t j = 0; j < b; j += Wd) {
    const Vd v = load(a + j, std::min(Wd, b - j));
    acc = acc + (l1 ? absv(v) : v * v);
  }
  const double s = hsum(acc);
  return static_cast<A>(l1 ? s : std::sqrt(s));
}

// g = a / den in the compute type, then as double.
template <typename A>
void normalize_row(const A* a, A den, int64_t b, A* tmp, double* g) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vden(den);
  for (int64_t j = 0; j < b; j += W) {
    const int64_t n = std::min(W, b - j);
    store(tmp + j, load(a + j, n) / vden, n);
  }
  at::vec::convert(tmp, g, b);
}

// dA for one row of one side: out_j = Dg_j / den + gn * dnorm_j, with
// gn = n >= eps ? -<Dg, G> / den : 0 and dnorm = sign(a) (L1) or a / n (L2).
template <typename A>
void row_grad(const double* a, const double* g, const double* dg, double n, double den, int64_t b, bool l1,
              double* tmp, A* out) {
  Vd dot(0.0);
  for (int64_t j = 0; j < b; j += Wd) {
    const int64_t k = std::min(Wd, b - j);
    dot = dot + load(dg + j, k) * load(g + j, k);
  }
  const double gn = n >= kSpEps ? -hsum(dot) / den : 0.0;
  const Vd vden(den), vgn(gn), zero(0.0), vn(n);
  for (int64_t j = 0; j < b; j += Wd) {
    const int64_t k = std::min(Wd, b - j);
    const Vd av = load(a + j, k);
    const Vd dn = l1 ? ones_where(gt(av, zero)) - ones_where(lt(av, zero)) : (n == 0.0 ? zero : av / vn);
    store(tmp + j, load(dg + j, k) / vden + vgn * dn, k);
  }
  at::vec::convert(tmp, out, b);
}

template <typename A>
void sp_rows_t(const A* as_, const A* at_, const A* w, int64_t b, bool l1, A* rows, A* das, A* dat) {
  at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(b, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<double> buf(6 * b);
    std::vector<A> tmpa(b);
    double *ad = buf.data(), *bd = ad + b, *gs = bd + b, *gt = gs + b, *dg = gt + b, *tmp = dg + b;
    for (int64_t r = r0; r < r1; ++r) {
      const A* as = as_ + r * b;
      const A* at = at_ + r * b;
      at::vec::convert(as, ad, b);
      at::vec::convert(at, bd, b);
      const double ns = row_norm<A>(ad, b, l1), nt = row_norm<A>(bd, b, l1);
      const A dens = static_cast<A>(ns < kSpEps ? kSpEps : ns);  // clamp_min: NaN stays NaN
      const A dent = static_cast<A>(nt < kSpEps ? kSpEps : nt);
      normalize_row(as, dens, b, tmpa.data(), gs);
      normalize_row(at, dent, b, tmpa.data(), gt);
      Vd sum(0.0);
      for (int64_t j = 0; j < b; j += Wd) {
        const int64_t k = std::min(Wd, b - j);
        const Vd diff = load(gt + j, k) - load(gs + j, k);
        store(dg + j, diff, k);
        sum = sum + diff * diff;
      }
      rows[r] = static_cast<A>(hsum(sum));
      if (das == nullptr && dat == nullptr) continue;
      // Dg_s = -2 w (G_t - G_s), Dg_t = -Dg_s
      const double two_w = 2.0 * static_cast<double>(w[r]);
      const Vd scale_s(-two_w), flip(-1.0), scale_t(two_w);
      if (das != nullptr) {
        for (int64_t j = 0; j < b; j += Wd) {
          const int64_t k = std::min(Wd, b - j);
          store(dg + j, load(dg + j, k) * scale_s, k);
        }
        row_grad(ad, gs, dg, ns, dens, b, l1, tmp, das + r * b);
      }
      if (dat != nullptr) {
        const Vd f = das != nullptr ? flip : scale_t;
        for (int64_t j = 0; j < b; j += Wd) {
          const int64_t k = std::min(Wd, b - j);
          store(dg + j, load(dg + j, k) * f, k);
        }
        row_grad(bd, gt, dg, nt, dent, b, l1, tmp, dat + r * b);
      }
    }
  });
}

}  // namespace

void sp_rows(Dtype acc, const void* as, const void* at, const void* w, int64_t b, bool l1, void* rows, void* das,
             void* dat) {
  with_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    sp_rows_t<A>(static_cast<const A*>(as), static_cast<const A*>(at), static_cast<const A*>(w), b, l1,
                 static_cast<A*>(rows), static_cast<A*>(das), static_cast<A*>(dat));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdk
