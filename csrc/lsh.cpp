// LSH feature mimicking on CPU: the hash logits are streamed in column chunks
// of N, never held as [B, N].
//
// Per chunk of nc hash functions (W_c = weight[n0:n0+nc], [nc, D]):
//   H = [f_s; f_t] @ W_c^T                      (one GEMM, [2B, nc]; [B, nc] with codes)
//   fused pass per row (bias added here):
//     y = h_t > 0 (NaN h_t -> NaN y), or bit j of the packed teacher codes
//     bce = (1 - y) h_s - min(h_s, 0) + log1p(exp(-|h_s|))  (row sums in double)
//     dh  = w_i (sigmoid(h_s) - y) / N                      (in place over h_s)
//   grad_s += dh @ W_c                          (one GEMM, accumulating)
// then l_i = bce_i / N + mse_weight * mean_d (f_s - f_t)^2 and the MSE
// gradients +-2 mse_weight w_i (f_s - f_t) / D in a last per-row pass.
// grad_t comes from the MSE term only (y is piecewise constant in f_t and the
// reference detaches it, NaN included).
#include "kdkernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace kdk {
namespace {

constexpr int kLanes = 16;

// ---------------------------------------------------------------- float math
// The Cephes polynomials, shared by the scalar (float) and vector (vf16) forms below.
template <class T>
C10_ALWAYS_INLINE T exp_poly(T r, T r2) {  // exp(r) for |r| <= ln(2)/2
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r2 + r + 1.0f;
}

template <class T>
C10_ALWAYS_INLINE T log_poly(T f, T z) {  // log(1 + f) - f + z/2 for f in [sqrt(2)/2 - 1, sqrt(2) - 1], z = f^2
  T y = T{} + 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  return y * f * z;
}

// exp(x) for x <= 0 (or NaN), written so gcc vectorises it (Cephes expf:
// Cody-Waite reduction + degree-6 polynomial, ~1 ulp); 0 below -88.
C10_ALWAYS_INLINE float exp_nonpos(float x) {
  const float xc = x < -88.0f ? -88.0f : x;
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  n = n != n ? 0.0f : n;  // NaN: keep the conversion below defined; the result is NaN from xc
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const float r2 = r * r;
  const float p = exp_poly(r, r2);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // n in [-127, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -88.0f ? 0.0f : p * scale;
}

// log1p(e) for e in [0, 1] (or NaN), given u = 1 + e and r = 1 / u: log(u) by
// the Cephes logf polynomial around 1 (u is halved above sqrt(2)), plus the
// rounding error of u, (e - (u - 1)) / u, so small e keep full relative accuracy.
// T is float or the float x 16 vector below (the gradient reuses r there: one
// division per element).
template <class T>
C10_ALWAYS_INLINE T log1p_from(T e, T u, T r) {
  const auto big = u > 1.41421356237f;
  const T m = big ? u * 0.5f : u;
  const T k = big ? T{} + 1.0f : T{} + 0.0f;
  const T f = m - 1.0f;
  const T z = f * f;
  T y = log_poly(f, z);
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  const T lg = f + y + 0.693359375f * k;
  return lg + (e - (u - 1.0f)) * r;
}

C10_ALWAYS_INLINE float log1p_unit(float e) {
  const float u = 1.0f + e;
  return log1p_from(e, u, 1.0f / u);
}

C10_ALWAYS_INLINE float exp_nonpos_any(float x) { return exp_nonpos(x); }
C10_ALWAYS_INLINE double exp_nonpos_any(double x) { return std::exp(x); }
C10_ALWAYS_INLINE float log1p_any(float e) { return log1p_unit(e); }
C10_ALWAYS_INLINE double log1p_any(double e) { return std::log1p(e); }

// ---------------------------------------------------------------- float x 16 (GCC/clang vector extensions)
// The same two functions on 16 floats at a time: gcc does not vectorise the
// scalar forms inside the fused loop, so the float path is written with
// vector types (one zmm register under AVX-512, split into AVX2 or SSE
// registers without it). Rounding to nearest uses the 1.5 * 2^23 trick
// (|x| < 128 here).
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

C10_ALWAYS_INLINE vf16 vload(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
C10_ALWAYS_INLINE void vstore(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }
C10_ALWAYS_INLINE vf16 vsplat(float x) { return vf16{} + x; }

C10_ALWAYS_INLINE vf16 exp_nonpos_v(vf16 x) {
  const vi16 under = x < -88.0f;
  const vf16 xc = under ? vsplat(-88.0f) : x;
  vf16 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  n = (n != n) ? vsplat(0.0f) : n;
  const vf16 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const vf16 r2 = r * r;
  const vf16 p = exp_poly(r, r2);
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  const vf16 scale = (vf16)bits;  // a vector cast reinterprets the bits
  return under ? vsplat(0.0f) : p * scale;
}

// ---------------------------------------------------------------- fused pass
// One row of one chunk: hs [n] (overwritten by dh when GS), ht [n] teacher
// logits or codes (the packed bits of the row; hash n0 is the chunk's first).
// Returns the row's BCE sum.
template <bool CODES, bool GS, typename A>
double lsh_row(A* __restrict hs, const A* __restrict ht, const uint8_t* __restrict codes, int64_t n0,
               const A* __restrict bias, int64_t n, A coef) {
  A lanes[kLanes] = {};
  auto elem = [&](int64_t j) -> A {
    const A h = hs[j] + (bias != nullptr ? bias[j] : A(0));
    A y;
    if constexpr (CODES) {
      const int64_t q = n0 + j;
      y = static_cast<A>((codes[q >> 3] >> (q & 7)) & 1);
    } else {
      const A hts = ht[j] + (bias != nullptr ? bias[j] : A(0));
      y = hts != hts ? hts : (hts > A(0) ? A(1) : A(0));
    }
    const A e = exp_nonpos_any(-std::abs(h));
    const A u = A(1) + e;
    // torch's form, (1 - y) h - log_sigmoid(h), so infinities give what the reference gives
    const A bce = (A(1) - y) * h - ((h < A(0) ? h : A(0)) - log1p_any(e));
    if constexpr (GS) {
      const A r = A(1) / u;
      const A sig = h >= A(0) ? r : e * r;
      hs[j] = coef * (sig - y);
    }
    return bce;
  };
  double sum = 0.0;
  int64_t j = 0;
  if constexpr (std::is_same<A, float>::value) {
    // 16 floats at a time, two accumulators, flushed to double every 512 columns
    vf16 acc0 = vsplat(0.0f), acc1 = vsplat(0.0f);
    const vf16 vcoef = vsplat(coef);
    auto vec16 = [&](int64_t k) -> vf16 {
      vf16 h = vload(hs + k);
      if (bias != nullptr) h += vload(bias + k);
      vf16 y;
      if constexpr (CODES) {
        const int64_t q = n0 + k;  // a multiple of 16: chunks start at multiples of 64
        const int32_t lo = codes[q >> 3], hi = codes[(q >> 3) + 1];
        const vi16 bytes = {lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi};
        const vi16 shifts = {0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7};
        y = __builtin_convertvector((bytes >> shifts) & 1, vf16);
      } else {
        vf16 hts = vload(ht + k);
        if (bias != nullptr) hts += vload(bias + k);
        y = (hts != hts) ? hts : ((hts > 0.0f) ? vsplat(1.0f) : vsplat(0.0f));
      }
      const vf16 e = exp_nonpos_v((h < 0.0f) ? h : -h);  // exp(-|h|); NaN stays NaN
      const vf16 u = 1.0f + e;
      const vf16 r = 1.0f / u;
      const vf16 bce = (1.0f - y) * h - (((h < 0.0f) ? h : vsplat(0.0f)) - log1p_from(e, u, r));
      if constexpr (GS) {
        const vf16 sig = (h >= 0.0f) ? r : e * r;
        vstore(hs + k, vcoef * (sig - y));
      }
      return bce;
    };
    int64_t since = 0;
    for (; j + 32 <= n; j += 32) {
      acc0 += vec16(j);
      acc1 += vec16(j + 16);
      if ((since += 32) >= 512) {
        for (int l = 0; l < 16; ++l) sum += static_cast<double>(acc0[l]) + static_cast<double>(acc1[l]);
        acc0 = vsplat(0.0f);
        acc1 = vsplat(0.0f);
        since = 0;
      }
    }
    if (j + 16 <= n) {  // leaves fewer than 16 for the scalar tail below (its lanes[kLanes])
      acc0 += vec16(j);
      j += 16;
    }
    for (int l = 0; l < 16; ++l) sum += static_cast<double>(acc0[l]) + static_cast<double>(acc1[l]);
  } else {
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += elem(j + l);
    }
  }
  for (int l = 0; j < n; ++j, ++l) lanes[l] += elem(j);
  for (int l = 0; l < kLanes; ++l) sum += static_cast<double>(lanes[l]);
  return sum;
}

template <bool CODES, bool GS, typename A>
void lsh_chunk_pass(A* H, int64_t B, int64_t nc, const uint8_t* codes, int64_t code_row, int64_t n0,
                    const A* bias, const A* w, double inv_n, double* bce_sum) {
  at::parallel_for(0, B, std::max<int64_t>(1, 2048 / std::max<int64_t>(nc, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      A* hs = H + i * nc;
      const A* ht = CODES ? nullptr : H + (B + i) * nc;
      const uint8_t* cr = CODES ? codes + i * code_row : nullptr;
      const A coef = static_cast<A>(static_cast<double>(w[i]) * inv_n);
      bce_sum[i] += lsh_row<CODES, GS, A>(hs, ht, cr, n0, bias, nc, coef);
    }
  });
}

// Columns per chunk: the [R, nc] logits block stays around 4 MiB (cache
// resident between the GEMM, the fused pass and the gradient GEMM; few enough
// chunks that the per-chunk GEMMs stay large), a multiple of 64 columns, and
// all of N when it fits.
int64_t chunk_columns(int64_t R, int64_t N, int64_t elem_size) {
  int64_t nc = (int64_t(4) << 20) / std::max<int64_t>(R * elem_size, 1);
  nc = std::max<int64_t>(256, std::min<int64_t>(nc, 8192)) / 64 * 64;
  return std::min(nc, N);
}

}  // namespace

TensorTriple lsh_forward(const Tensor& f_s, const c10::optional<Tensor>& f_t_opt, const Tensor& weight,
                         const c10::optional<Tensor>& bias_opt, const c10::optional<Tensor>& codes_opt,
                         double mse_weight, const Tensor& row_weight, bool need_grad_s, bool need_grad_t) {
  TORCH_CHECK(f_s.dim() == 2 && weight.dim() == 2 && weight.size(1) == f_s.size(1), "kdkernels lsh: shape mismatch");
  const int64_t B = f_s.size(0), D = f_s.size(1), N = weight.size(0);
  const auto acc_type = compute_scalar_type(f_s.scalar_type());
  const auto acc_opts = f_s.options().dtype(acc_type);
  const bool has_ft = f_t_opt.has_value() && f_t_opt->defined();
  const bool use_codes = codes_opt.has_value() && codes_opt->defined();
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  TORCH_CHECK(has_ft || use_codes, "kdkernels lsh: needs f_t or teacher_codes");
  TORCH_CHECK(has_ft || mse_weight == 0.0, "kdkernels lsh: the MSE term needs f_t");
  TORCH_CHECK(row_weight.numel() == B && row_weight.scalar_type() == acc_type,
              "kdkernels lsh: row_weight must be [B] in the compute dtype");
  const bool use_mse = has_ft && mse_weight != 0.0;
  need_grad_t = need_grad_t && has_ft;

  const Tensor Fs = contiguous_as(f_s, acc_type);
  const Tensor Ft = has_ft ? contiguous_as(*f_t_opt, acc_type) : Tensor();
  const Tensor W = contiguous_as(weight, acc_type);
  const Tensor bias = has_bias ? contiguous_as(*bias_opt, acc_type) : Tensor();
  const Tensor codes = use_codes ? codes_opt->contiguous() : Tensor();
  if (use_codes) {
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(0) == B &&
                    codes.size(1) * 8 >= N,
                "kdkernels lsh: teacher_codes must be uint8 [B, ceil(N/8)]");
  }
  const Tensor w = row_weight.contiguous();
  const Tensor X = use_codes ? Fs : at::cat({Fs, Ft}, 0);  // [R, D]
  const int64_t R = X.size(0);

  Tensor rows = at::empty({B}, acc_opts);
  Tensor grad_s = need_grad_s ? at::empty_like(f_s) : at::empty({0}, f_s.options());
  Tensor grad_t = need_grad_t ? at::empty_like(*f_t_opt) : at::empty({0}, f_s.options());
  // gradient accumulators in the compute dtype: the outputs themselves when they can be
  const bool gs_direct = need_grad_s && grad_s.scalar_type() == acc_type && grad_s.is_contiguous();
  Tensor Gs = need_grad_s ? (gs_direct ? grad_s : at::empty({B, D}, acc_opts)) : Tensor();

  std::vector<double> bce_sum(B, 0.0);
  const double inv_n = 1.0 / static_cast<double>(N);

  if (B > 0 && N > 0) {
    const int64_t nc_max = chunk_columns(R, N, X.element_size());
    Tensor Hbuf = at::empty({R * nc_max}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "kdkernels_lsh_forward", [&] {
      using A = scalar_t;
      for (int64_t n0 = 0; n0 < N; n0 += nc_max) {
        const int64_t nc = std::min(nc_max, N - n0);
        Tensor H = Hbuf.narrow(0, 0, R * nc).view({R, nc});
        const Tensor Wc = W.narrow(0, n0, nc);  // [nc, D]
        gemm_into(H, X, Wc.t(), false);
        A* hp = H.mutable_data_ptr<A>();
        const A* bp = has_bias ? bias.const_data_ptr<A>() + n0 : nullptr;
        const A* wp = w.const_data_ptr<A>();
        const uint8_t* cp = use_codes ? codes.const_data_ptr<uint8_t>() : nullptr;
        const int64_t code_row = use_codes ? codes.stride(0) : 0;
        double* bs = bce_sum.data();
        if (use_codes) {
          if (need_grad_s) {
            lsh_chunk_pass<true, true, A>(hp, B, nc, cp, code_row, n0, bp, wp, inv_n, bs);
          } else {
            lsh_chunk_pass<true, false, A>(hp, B, nc, cp, code_row, n0, bp, wp, inv_n, bs);
          }
        } else if (need_grad_s) {
          lsh_chunk_pass<false, true, A>(hp, B, nc, cp, code_row, n0, bp, wp, inv_n, bs);
        } else {
          lsh_chunk_pass<false, false, A>(hp, B, nc, cp, code_row, n0, bp, wp, inv_n, bs);
        }
        if (need_grad_s) {
          const Tensor dH = H.narrow(0, 0, B);  // [B, nc], contiguous
          gemm_into(Gs, dH, Wc, n0 > 0);
        }
      }
    });
  } else if (need_grad_s) {
    Gs.zero_();
  }

  // Last pass per row: the loss, the MSE term and the gradients' final form.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f_s.scalar_type(), "kdkernels_lsh_rows", [&] {
    using A = acc_t<scalar_t>;
    const A* fs = Fs.const_data_ptr<A>();
    const A* ft = has_ft ? Ft.const_data_ptr<A>() : nullptr;
    const A* wp = w.const_data_ptr<A>();
    A* rp = rows.mutable_data_ptr<A>();
    const A* gsa = need_grad_s ? Gs.const_data_ptr<A>() : nullptr;
    // outputs with unit inner stride (row_major_work copies otherwise)
    Tensor work_s = need_grad_s ? (gs_direct ? grad_s : row_major_work(grad_s)) : Tensor();
    Tensor work_t = need_grad_t ? row_major_work(grad_t) : Tensor();
    scalar_t* go_s = need_grad_s ? work_s.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* go_t = need_grad_t ? work_t.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t os_row = need_grad_s ? work_s.stride(0) : 0;
    const int64_t ot_row = need_grad_t ? work_t.stride(0) : 0;
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const A* fsi = fs + i * D;
        const A* fti = use_mse ? ft + i * D : nullptr;
        double mse = 0.0;
        if (use_mse) {
          A lanes[kLanes] = {};
          int64_t d = 0;
          for (; d + kLanes <= D; d += kLanes)
            for (int l = 0; l < kLanes; ++l) {
              const A df = fsi[d + l] - fti[d + l];
              lanes[l] += df * df;
            }
          for (int l = 0; d < D; ++d, ++l) {
            const A df = fsi[d] - fti[d];
            lanes[l] += df * df;
          }
          for (int l = 0; l < kLanes; ++l) mse += static_cast<double>(lanes[l]);
          mse = mse_weight * mse / static_cast<double>(D);
        }
        rp[i] = static_cast<A>(bce_sum[i] * inv_n + mse);
        const A c = static_cast<A>(use_mse ? 2.0 * mse_weight * static_cast<double>(wp[i]) / static_cast<double>(D)
                                           : 0.0);
        if (go_s != nullptr) {
          const A* g = gsa + i * D;
          scalar_t* o = go_s + i * os_row;
          if (use_mse) {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(g[d] + c * (fsi[d] - fti[d]));
          } else if (static_cast<const void*>(o) != static_cast<const void*>(g)) {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(g[d]);
          }
        }
        if (go_t != nullptr) {
          scalar_t* o = go_t + i * ot_row;
          if (use_mse) {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(-c * (fsi[d] - fti[d]));
          } else {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(0);
          }
        }
      }
    });
    if (need_grad_s) finish_output(grad_s, work_s);
    if (need_grad_t) finish_output(grad_t, work_t);
  });
  return {rows, grad_s, grad_t};
}

}  // namespace kdk
