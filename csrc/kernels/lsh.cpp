// LSH's fused passes (math: csrc/lsh.cpp): the per-chunk BCE pass over the
// hash logits and the last per-row pass. float runs on float vectors with
// polynomial exp/log1p (Cephes' exp; a fitted log1p), the same arithmetic on every ISA level,
// written without comparisons or blends (ATen's are 2-3 instructions each on AVX-512);
// double keeps std::exp/std::log1p in fixed scalar lanes.
#include <cmath>
#include <cstring>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
namespace {

using Vf = Vectorized<float>;
using Vi = Vectorized<int32_t>;
constexpr int kLanes = 16;

C10_ALWAYS_INLINE Vf k(float x) { return Vf(x); }

// exp(r) for |r| <= ln(2)/2
C10_ALWAYS_INLINE Vf exp_poly(const Vf& r, const Vf& r2) {
  Vf p = k(1.9875691500e-4f);
  p = p * r + k(1.3981999507e-3f);
  p = p * r + k(8.3334519073e-3f);
  p = p * r + k(4.1665795894e-2f);
  p = p * r + k(1.6666665459e-1f);
  p = p * r + k(5.0000001201e-1f);
  return p * r2 + r + k(1.0f);
}

// exp(x) for x <= 0 (or NaN): Cody-Waite reduction and a degree-6 polynomial
// (~1 ulp). n = round(x / ln 2) by the 1.5 * 2^23 trick: t = x / ln 2 + 1.5 * 2^23
// holds n in its low mantissa bits, so the bits of 2^n, (n + 127) << 23, are
// (bits(t) << 23) + (127 << 23) in 32-bit integers. Below -88 the clamp gives
// n = -127, whose scale is +0: the result is 0. NaN stays NaN (clamp_min keeps
// its first operand when it is NaN, on every ISA level), and the integer steps
// are defined for any bits.
C10_ALWAYS_INLINE Vf exp_nonpos(const Vf& x) {
  const Vf xc = at::vec::clamp_min(x, k(-88.0f));
  const Vf t = xc * k(1.44269504088896341f) + k(12582912.0f);
  const Vf n = t - k(12582912.0f);
  const Vf r = xc - n * k(0.693359375f) + n * k(2.12194440e-4f);
  const Vi scale = (at::vec::cast<int32_t>(t) << Vi(23)) + Vi(127 << 23);
  return exp_poly(r, r * r) * at::vec::cast<float>(scale);
}

// log1p(e) for e in [0, 1] (or NaN) as e * P(e), P a degree-9 polynomial fitted
// to log1p(e) / e on [0, 1] (<= 2.1 ulp in float32 without fma, measured on 2M
// points; relative accuracy kept for small e): no division, no range split.
C10_ALWAYS_INLINE Vf log1p_unit(const Vf& e) {
  Vf p = k(-3.256378462538123e-3f);
  p = p * e + k(1.9907161593437195e-2f);
  p = p * e + k(-5.7064201682806015e-2f);
  p = p * e + k(1.0614264756441116e-1f);
  p = p * e + k(-1.5311862528324127e-1f);
  p = p * e + k(1.9678117334842682e-1f);
  p = p * e + k(-2.4954558908939362e-1f);
  p = p * e + k(3.3330005407333374e-1f);
  p = p * e + k(-4.999990463256836e-1f);
  return (p * e + k(1.0f)) * e;
}

// 1 where t > 0, 0 where t <= 0, NaN where t is NaN: max(t, 0) scaled by 2^200
// (the smallest positive float reaches >= 1) and clamped at 1; both clamps
// keep a NaN first operand.
C10_ALWAYS_INLINE Vf teacher_bit(const Vf& t) {
  const Vf big(0x1p100f);
  return at::vec::clamp_max(at::vec::clamp_min(t, k(0.0f)) * big * big, k(1.0f));
}

// All bits set in the lanes where x has its sign bit set (x < 0 or -0 or a
// negative NaN), by an arithmetic shift of the bits.
C10_ALWAYS_INLINE Vf sign_mask(const Vf& x) {
  return at::vec::cast<float>(at::vec::cast<int32_t>(x) >> Vi(31));
}

// y for 8 consecutive hash bits: kBits[byte][bit]
struct BitTable {
  float v[256][8];
  constexpr BitTable() : v() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 8; ++j) v[b][j] = static_cast<float>((b >> j) & 1);
  }
};
constexpr BitTable kBits{};

// One row of one float chunk; returns the row's BCE sum. hs [n] (overwritten
// by dh when GS), ht [n] teacher logits or the row's packed codes (hash n0 is
// the chunk's first; n0 is a multiple of 64).
template <bool CODES, bool GS>
double lsh_row_float(float* __restrict hs, const float* __restrict ht, const uint8_t* __restrict codes, int64_t n0,
                     const float* __restrict bias, int64_t n, float coef) {
  constexpr int64_t W = Vf::size();
  const Vf zero(0.0f), one(1.0f), vcoef(coef);
  Vf acc(0.0f);
  double sum = 0.0;
  auto step = [&](int64_t j, int64_t cnt) {
    Vf h = load(hs + j, cnt);
    if (bias != nullptr) h = h + load(bias + j, cnt);
    Vf y;
    if constexpr (CODES) {
      __at_align__ float yb[W] = {};
      const int64_t q = n0 + j;
      if constexpr (W % 8 == 0) {  // q is a multiple of 8
        for (int64_t l = 0; l < cnt; l += 8) std::memcpy(yb + l, kBits.v[codes[(q + l) >> 3]], 8 * sizeof(float));
      } else {
        for (int64_t l = 0; l < cnt; ++l) yb[l] = static_cast<float>((codes[(q + l) >> 3] >> ((q + l) & 7)) & 1);
      }
      y = Vf::loadu(yb);
    } else {
      Vf hts = load(ht + j, cnt);
      if (bias != nullptr) hts = hts + load(bias + j, cnt);
      y = teacher_bit(hts);  // NaN teacher -> NaN target
    }
    const Vf e = exp_nonpos(h | k(-0.0f));  // exp(-|h|); NaN stays NaN
    // torch's form, (1 - y) h - log_sigmoid(h) = (1 - y) h - (min(h, 0) - log1p(e)),
    // so infinities give what the reference gives
    const Vf bce = (one - y) * h - (at::vec::clamp_max(h, zero) - log1p_unit(e));
    if constexpr (GS) {
      const Vf r = one / (one + e);
      const Vf er = e * r;
      const Vf sig = r ^ ((r ^ er) & sign_mask(h));  // h < 0 ? e / (1 + e) : 1 / (1 + e)
      store(hs + j, vcoef * (sig - y), cnt);
    }
    acc = acc + first(bce, cnt);
  };
  int64_t j = 0, since = 0;
  for (; j + W <= n; j += W) {
    step(j, W);
    if ((since += W) >= 512) {  // float lanes flushed to double every 512 columns
      add_lanes(sum, acc);
      acc = zero;
      since = 0;
    }
  }
  if (j < n) step(j, n - j);
  add_lanes(sum, acc);
  return sum;
}

template <bool CODES, bool GS>
double lsh_row_double(double* __restrict hs, const double* __restrict ht, const uint8_t* __restrict codes, int64_t n0,
                      const double* __restrict bias, int64_t n, double coef) {
  double lanes[kLanes] = {};
  auto elem = [&](int64_t j) -> double {
    const double h = hs[j] + (bias != nullptr ? bias[j] : 0.0);
    double y;
    if constexpr (CODES) {
      const int64_t q = n0 + j;
      y = static_cast<double>((codes[q >> 3] >> (q & 7)) & 1);
    } else {
      const double hts = ht[j] + (bias != nullptr ? bias[j] : 0.0);
      y = hts != hts ? hts : (hts > 0.0 ? 1.0 : 0.0);
    }
    const double e = std::exp(-std::abs(h));
    const double bce = (1.0 - y) * h - ((h < 0.0 ? h : 0.0) - std::log1p(e));
    if constexpr (GS) {
      const double r = 1.0 / (1.0 + e);
      const double sig = h >= 0.0 ? r : e * r;
      hs[j] = coef * (sig - y);
    }
    return bce;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += elem(j + l);
  for (int l = 0; j < n; ++j, ++l) lanes[l] += elem(j);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <bool CODES, bool GS, typename A>
void chunk_pass(A* Hs, const A* Ht, int64_t B, int64_t nc, const uint8_t* codes, int64_t code_row, int64_t n0, const A* bias,
                const A* w, double inv_n, double* bce_sum) {
  at::parallel_for(0, B, std::max<int64_t>(1, 2048 / std::max<int64_t>(nc, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A* hs = Hs + i * nc;
      const A* ht = CODES ? nullptr : Ht + i * nc;
      const uint8_t* cr = CODES ? codes + i * code_row : nullptr;
      const A coef = static_cast<A>(static_cast<double>(w[i]) * inv_n);
      if constexpr (std::is_same_v<A, float>) {
        bce_sum[i] += lsh_row_float<CODES, GS>(hs, ht, cr, n0, bias, nc, coef);
      } else {
        bce_sum[i] += lsh_row_double<CODES, GS>(hs, ht, cr, n0, bias, nc, coef);
      }
    }
  });
}

// The last pass of one row: returns mse_weight * mean_d (fs - ft)^2 (0 without
// MSE) and writes go_s = g + c (fs - ft), go_t = -c (fs - ft) with
// c = 2 mse_weight w / D (go_s = g, go_t = 0 without MSE).
template <typename T>
double last_row(const acc_t<T>* fs, const acc_t<T>* ft, bool use_mse, double mse_weight, double w, const acc_t<T>* g,
                T* go_s, T* go_t, int64_t D) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  double mse = 0.0;
  if (use_mse) {
    V acc(A(0));
    for (int64_t d = 0; d < D; d += W) {
      const int64_t n = std::min(W, D - d);
      const V df = load(fs + d, n) - load(ft + d, n);
      acc = acc + df * df;
    }
    add_lanes(mse, acc);
    mse = mse_weight * mse / static_cast<double>(D);
  }
  const A c = static_cast<A>(use_mse ? 2.0 * mse_weight * w / static_cast<double>(D) : 0.0);
  const V vc(c), zero(A(0));
  __at_align__ A os[kTile], ot[kTile];
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    const int64_t len = std::min(kTile, D - d0);
    A* so = std::is_same_v<T, A> && go_s != nullptr ? reinterpret_cast<A*>(go_s + d0) : os;
    A* to = std::is_same_v<T, A> && go_t != nullptr ? reinterpret_cast<A*>(go_t + d0) : ot;
    for (int64_t k = 0; k < len; k += W) {
      const int64_t n = std::min(W, len - k), d = d0 + k;
      const V df = use_mse ? load(fs + d, n) - load(ft + d, n) : zero;
      if (go_s != nullptr) store(so + k, use_mse ? load(g + d, n) + vc * df : load(g + d, n), n);
      if (go_t != nullptr) store(to + k, use_mse ? neg(vc * df) : zero, n);
    }
    if constexpr (!std::is_same_v<T, A>) {
      if (go_s != nullptr) at::vec::convert(os, go_s + d0, len);
      if (go_t != nullptr) at::vec::convert(ot, go_t + d0, len);
    }
  }
  return mse;
}

}  // namespace

void lsh_chunk(Dtype acc, bool use_codes, bool gs, void* Hs, const void* Ht, int64_t B, int64_t nc, const uint8_t* codes,
               int64_t code_row, int64_t n0, const void* bias, const void* w, double inv_n, double* bce_sum) {
  with_acc(acc, [&](auto tag) {
    using A = decltype(tag);
    A* hp = static_cast<A*>(Hs);
    const A* tp = static_cast<const A*>(Ht);
    const A* bp = static_cast<const A*>(bias);
    const A* wp = static_cast<const A*>(w);
    if (use_codes) {
      if (gs) {
        chunk_pass<true, true, A>(hp, tp, B, nc, codes, code_row, n0, bp, wp, inv_n, bce_sum);
      } else {
        chunk_pass<true, false, A>(hp, tp, B, nc, codes, code_row, n0, bp, wp, inv_n, bce_sum);
      }
    } else if (gs) {
      chunk_pass<false, true, A>(hp, tp, B, nc, codes, code_row, n0, bp, wp, inv_n, bce_sum);
    } else {
      chunk_pass<false, false, A>(hp, tp, B, nc, codes, code_row, n0, bp, wp, inv_n, bce_sum);
    }
  });
}

void lsh_rows(Dtype dtype, const void* fs, const void* ft, const void* w, void* rows, const double* bce_sum,
              double inv_n, double mse_weight, bool use_mse, const void* gacc, void* go_s, int64_t os_row,
              void* go_t, int64_t ot_row, int64_t B, int64_t D) {
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const A* fsp = static_cast<const A*>(fs);
    const A* ftp = static_cast<const A*>(ft);
    const A* wp = static_cast<const A*>(w);
    const A* gp = static_cast<const A*>(gacc);
    A* rp = static_cast<A*>(rows);
    T* os = static_cast<T*>(go_s);
    T* ot = static_cast<T*>(go_t);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double mse = last_row<T>(fsp + i * D, use_mse ? ftp + i * D : nullptr, use_mse, mse_weight,
                                       static_cast<double>(wp[i]), os != nullptr ? gp + i * D : nullptr,
                                       os != nullptr ? os + i * os_row : nullptr,
                                       ot != nullptr ? ot + i * ot_row : nullptr, D);
        rp[i] = static_cast<A>(bce_sum[i] * inv_n + mse);
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdk
