// ND's row kernel (math: csrc/nd.cpp). float, float16 and bfloat16 rows run on
// float vectors (the student and teacher squares accumulated in double, exact
// for float inputs); double rows keep scalar lanes with double-double norms
// (they need a true fma, which ATen's DEFAULT vectors do not promise).
#include <cmath>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int kLanes = 16;
// Software prefetch distance, in elements: the first sweep asks for the data
// this far ahead, running on into the next row of the block at the row's end
// (that row's centre is a gather the hardware prefetcher cannot guess).
constexpr int64_t kPrefetchAhead = 1024;

// The four dot products of one row (s.s, t.t, c.c, s.c), each summed in
// double at the end in a fixed order.
struct RowDots {
  double ss, tt, cc, sc;
};

C10_ALWAYS_INLINE void prefetch_ahead(const void* si, const void* ti, const void* ci, const void* sn,
                                      const void* tn, const void* cn, int64_t d, int64_t D, int64_t esize) {
  const int64_t ahead = d + kPrefetchAhead;
  if (ahead < D) {
    __builtin_prefetch(static_cast<const char*>(si) + ahead * esize);
    __builtin_prefetch(static_cast<const char*>(ti) + ahead * esize);
    __builtin_prefetch(static_cast<const char*>(ci) + ahead * esize);
  } else if (sn != nullptr && ahead - D < D) {
    __builtin_prefetch(static_cast<const char*>(sn) + (ahead - D) * esize);
    __builtin_prefetch(static_cast<const char*>(tn) + (ahead - D) * esize);
    __builtin_prefetch(static_cast<const char*>(cn) + (ahead - D) * esize);
  }
}

// float vectors: tiles of kTile elements (converted to float when T is a
// half type; the squares of s and t through double tiles).
template <typename T>
RowDots row_dots_vec(const T* si, const T* ti, const T* ci, const T* sn, const T* tn, const T* cn, int64_t D) {
  using Vf = Vectorized<float>;
  using Vd = Vectorized<double>;
  constexpr int64_t Wf = Vf::size(), Wd = Vd::size();
  __at_align__ float sb[kTile], tb[kTile], cb[kTile];
  __at_align__ double sd[kTile], td[kTile];
  Vd ss(0.0), tt(0.0);
  Vf cc(0.0f), sc(0.0f);
  for (int64_t d = 0; d < D; d += kTile) {
    const int64_t len = std::min(kTile, D - d);
    const float* sf = as_acc(si + d, sb, len);
    const float* tf = as_acc(ti + d, tb, len);
    const float* cf = as_acc(ci + d, cb, len);
    at::vec::convert(sf, sd, len);
    at::vec::convert(tf, td, len);
    for (int64_t k = 0; k < len; k += Wf) {
      if (k % 16 == 0) prefetch_ahead(si, ti, ci, sn, tn, cn, d + k, D, sizeof(T));
      const int64_t n = std::min(Wf, len - k);
      const Vf sv = load(sf + k, n), cv = load(cf + k, n);
      cc += cv * cv;
      sc += sv * cv;
    }
    for (int64_t k = 0; k < len; k += Wd) {
      const int64_t n = std::min(Wd, len - k);
      const Vd sv = load(sd + k, n), tv = load(td + k, n);
      ss += sv * sv;
      tt += tv * tv;
    }
  }
  RowDots r{0.0, 0.0, 0.0, 0.0};
  add_lanes(r.ss, ss);
  add_lanes(r.tt, tt);
  add_lanes(r.cc, cc);
  add_lanes(r.sc, sc);
  return r;
}

// double rows: x*x summed in double-double (TwoProduct by fma + TwoSum, ~106
// bits) per lane, rounded once, so a permutation of a row gives bitwise the
// same norm and exact ties stay ties.
struct SqNorm2 {
  double hi[kLanes] = {}, lo[kLanes] = {};
  C10_ALWAYS_INLINE void add(int j, double x) {
    const double p = x * x;
    const double pe = std::fma(x, x, -p);
    const double sum = hi[j] + p;
    const double bv = sum - hi[j];
    const double err = (hi[j] - (sum - bv)) + (p - bv);
    hi[j] = sum;
    lo[j] += err + pe;
  }
  double total() const {
    double h = 0.0, l = 0.0;
    for (int j = 0; j < kLanes; ++j) {
      const double sum = h + hi[j];
      const double bv = sum - h;
      l += (h - (sum - bv)) + (hi[j] - bv) + lo[j];
      h = sum;
    }
    return h + l;
  }
};

RowDots row_dots_double(const double* si, const double* ti, const double* ci, const double* sn, const double* tn,
                        const double* cn, int64_t D) {
  SqNorm2 ss, tt;
  double cc[kLanes] = {}, sc[kLanes] = {};
  auto elem = [&](int j, int64_t d) {
    const double sv = si[d], tv = ti[d], cv = ci[d];
    ss.add(j, sv);
    tt.add(j, tv);
    cc[j] += cv * cv;
    sc[j] += sv * cv;
  };
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    prefetch_ahead(si, ti, ci, sn, tn, cn, d, D, sizeof(double));
    for (int j = 0; j < kLanes; ++j) elem(j, d + j);
  }
  for (int j = 0; d < D; ++d, ++j) elem(j, d);
  RowDots r{ss.total(), tt.total(), 0.0, 0.0};
  for (int j = 0; j < kLanes; ++j) {
    r.cc += cc[j];
    r.sc += sc[j];
  }
  return r;
}

// go = a * x + b * y (y may be null: go = a * x), in the compute type.
template <typename T>
void axpby_row(T* go, acc_t<T> a, const T* x, acc_t<T> b, const T* y, int64_t D) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  __at_align__ A xb[kTile], yb[kTile], ob[kTile];
  const V va(a), vb(b);
  for (int64_t d = 0; d < D; d += kTile) {
    const int64_t len = std::min(kTile, D - d);
    const A* xf = as_acc(x + d, xb, len);
    const A* yf = y != nullptr ? as_acc(y + d, yb, len) : nullptr;
    A* of = std::is_same_v<T, A> ? reinterpret_cast<A*>(go + d) : ob;
    for (int64_t k = 0; k < len; k += W) {
      const int64_t n = std::min(W, len - k);
      V v = va * load(xf + k, n);
      if (yf != nullptr) v = v + vb * load(yf + k, n);
      store(of + k, v, n);
    }
    if constexpr (!std::is_same_v<T, A>) at::vec::convert(ob, go + d, len);
  }
}

template <typename T>
void nd_kernel(const T* s, int64_t s_row, const T* t, int64_t t_row, const T* c, int64_t c_row,
               const int64_t* labels, const acc_t<T>* row_weight, double eps, int64_t B, int64_t D,
               acc_t<T>* rows, T* gs, int64_t gs_row, T* gt, int64_t gt_row) {
  using A = acc_t<T>;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* si = s + i * s_row;
      const T* ti = t + i * t_row;
      const T* ci = c + labels[i] * c_row;
      const bool has_next = i + 1 < i1;
      const T* sn = has_next ? si + s_row : nullptr;
      const T* tn = has_next ? ti + t_row : nullptr;
      const T* cn = has_next ? c + labels[i + 1] * c_row : nullptr;
      RowDots r;
      if constexpr (std::is_same_v<T, double>) {
        r = row_dots_double(si, ti, ci, sn, tn, cn, D);
      } else {
        r = row_dots_vec(si, ti, ci, sn, tn, cn, D);
      }
      // Scalars in the compute dtype's precision, combined in double.
      const double ns = static_cast<A>(std::sqrt(r.ss));
      const double nt = static_cast<A>(std::sqrt(r.tt));
      const double cn_raw = static_cast<A>(std::sqrt(r.cc));
      const double cnorm = cn_raw < eps ? eps : cn_raw;  // clamp_min: NaN stays NaN
      const double se = r.sc / cnorm;
      const bool teacher_wins = (nt > ns) || std::isnan(nt);
      const double winner = teacher_wins ? nt : ns;
      const double den = winner < eps ? eps : winner;
      rows[i] = static_cast<A>(1.0 - se / den);
      if (gs == nullptr && gt == nullptr) continue;
      const double w = static_cast<double>(row_weight[i]);
      const double gden = winner >= eps ? w * se / (den * den) : 0.0;
      const double gnt = teacher_wins ? gden : 0.0;
      const double gns = teacher_wins ? 0.0 : gden;
      if (gs != nullptr) {
        axpby_row(gs + i * gs_row, static_cast<A>(-w / den / cnorm), ci, static_cast<A>(ns == 0.0 ? 0.0 : gns / ns),
                  si, D);
      }
      if (gt != nullptr) axpby_row<T>(gt + i * gt_row, static_cast<A>(nt == 0.0 ? 0.0 : gnt / nt), ti, A(0), nullptr, D);
    }
  });
}

}  // namespace

void nd(Dtype dtype, const void* s, int64_t s_row, const void* t, int64_t t_row, const void* c, int64_t c_row,
        const int64_t* labels, const void* row_weight, double eps, int64_t B, int64_t D, void* rows, void* gs,
        int64_t gs_row, void* gt, int64_t gt_row) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    nd_kernel<T>(static_cast<const T*>(s), s_row, static_cast<const T*>(t), t_row, static_cast<const T*>(c), c_row,
                 labels, static_cast<const A*>(row_weight), eps, B, D, static_cast<A*>(rows), static_cast<T*>(gs),
                 gs_row, static_cast<T*>(gt), gt_row);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdk
