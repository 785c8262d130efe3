// Shared helpers of the per-ISA kernels (csrc/kernels/*.cpp). Each kernel
// module compiles these with its own ISA flags and CPU_CAPABILITY, so the code
// lives in kdk::CPU_CAPABILITY (as ATen's at::vec does) and is never linked
// into another module.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../kernels.h"

namespace kdk {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Compute type: double for double, float for float, float16 and bfloat16.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// f(T{}) for the element type named by `d`.
template <class F>
decltype(auto) with_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kDouble: return f(double{});
    case Dtype::kHalf: return f(c10::Half{});
    case Dtype::kBFloat16: return f(c10::BFloat16{});
    case Dtype::kFloat: break;
  }
  return f(float{});
}

// f(A{}) for a compute dtype (float or double).
template <class F>
decltype(auto) with_acc(Dtype d, F&& f) {
  return d == Dtype::kDouble ? f(double{}) : f(float{});
}

// Elements per tile when a float16/bfloat16 row is converted to float first.
constexpr int64_t kTile = 256;

// p as compute-type elements: p itself when T already is, else its first n
// (<= kTile) elements converted into buf.
template <typename T>
C10_ALWAYS_INLINE const acc_t<T>* as_acc(const T* p, acc_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return p;
  } else {
    at::vec::convert(p, buf, n);
    return buf;
  }
}

// v loaded from p (n <= size() elements; the rest are 0).
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> load(const A* p, int64_t n) {
  return n == Vectorized<A>::size() ? Vectorized<A>::loadu(p) : Vectorized<A>::loadu(p, n);
}
template <typename A>
C10_ALWAYS_INLINE void store(A* p, const Vectorized<A>& v, int64_t n) {
  if (n == Vectorized<A>::size()) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}
// store() for an output too big to stay in cache: a whole vector at an aligned
// address goes out as a non-temporal store (AVX-512, AVX2), which skips reading
// the line in first (a plain store's read-for-ownership: a third more memory
// traffic for a pass that reads two inputs and writes one output). Each thread
// calls stream_fence() after its streaming stores, before its results are used.
template <typename A>
C10_ALWAYS_INLINE void store_stream(A* p, const Vectorized<A>& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr uintptr_t kAlign = sizeof(Vectorized<A>);
  if (n == Vectorized<A>::size() && (reinterpret_cast<uintptr_t>(p) & (kAlign - 1)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<A, float>) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_stream_pd(p, v);
    }
#else
    if constexpr (std::is_same_v<A, float>) {
      _mm256_stream_ps(p, v);
    } else {
      _mm256_stream_pd(p, v);
    }
#endif
    return;
  }
#endif
  store(p, v, n);
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// v with lanes from n on set to 0 (a partial vector's unused lanes).
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> first(const Vectorized<A>& v, int64_t n) {
  return n == Vectorized<A>::size() ? v : Vectorized<A>::set(Vectorized<A>(A(0)), v, n);
}
// The lanes of v added to `sum` in lane order (deterministic).
template <typename A>
C10_ALWAYS_INLINE void add_lanes(double& sum, const Vectorized<A>& v) {
  __at_align__ A lanes[Vectorized<A>::size()];
  v.store(lanes);
  for (int64_t l = 0; l < Vectorized<A>::size(); ++l) sum += static_cast<double>(lanes[l]);
}
// Comparisons (all bits set per true lane), selects, neg and abs. ATen's
// DEFAULT vectors on x86 are portable C++ whose comparisons and blends go lane
// by lane through memset and branches, which GCC leaves scalar; there these are
// lane loops over integer masks that GCC vectorises with the baseline SSE2.
// Everywhere else (AVX2, AVX-512, NEON) they are ATen's own operations.
#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__aarch64__)
template <typename A, class Op>
C10_ALWAYS_INLINE Vectorized<A> lanes_op(const Vectorized<A>& a, const Vectorized<A>& b, Op op) {
  constexpr int64_t W = Vectorized<A>::size();
  __at_align__ A av[W], bv[W], out[W];
  a.store(av);
  b.store(bv);
  for (int64_t l = 0; l < W; ++l) out[l] = op(av[l], bv[l]);
  return Vectorized<A>::loadu(out);
}
template <typename A, class Pred>
C10_ALWAYS_INLINE Vectorized<A> mask_op(const Vectorized<A>& a, const Vectorized<A>& b, Pred pred) {
  using I = at::vec::int_same_size_t<A>;
  constexpr int64_t W = Vectorized<A>::size();
  __at_align__ A av[W], bv[W];
  __at_align__ I out[W];
  a.store(av);
  b.store(bv);
  for (int64_t l = 0; l < W; ++l) out[l] = pred(av[l], bv[l]) ? I(-1) : I(0);
  return Vectorized<A>::loadu(out);
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> gt(const Vectorized<A>& a, const Vectorized<A>& b) {
  return mask_op(a, b, [](A x, A y) { return x > y; });
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> lt(const Vectorized<A>& a, const Vectorized<A>& b) {
  return mask_op(a, b, [](A x, A y) { return x < y; });
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> isnan_mask(const Vectorized<A>& a) {
  return mask_op(a, a, [](A x, A) { return x != x; });
}
// mask ? b : a (mask: all bits or none per lane)
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> select(const Vectorized<A>& a, const Vectorized<A>& b, const Vectorized<A>& mask) {
  using I = at::vec::int_same_size_t<A>;
  constexpr int64_t W = Vectorized<A>::size();
  __at_align__ I av[W], bv[W], mv[W], out[W];
  a.store(av);
  b.store(bv);
  mask.store(mv);
  for (int64_t l = 0; l < W; ++l) out[l] = (bv[l] & mv[l]) | (av[l] & ~mv[l]);
  return Vectorized<A>::loadu(out);
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> neg(const Vectorized<A>& a) {
  return lanes_op(a, a, [](A x, A) { return -x; });
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> absv(const Vectorized<A>& a) {
  return lanes_op(a, a, [](A x, A) { return std::abs(x); });
}
#else
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> gt(const Vectorized<A>& a, const Vectorized<A>& b) {
  return a > b;
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> lt(const Vectorized<A>& a, const Vectorized<A>& b) {
  return a < b;
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> isnan_mask(const Vectorized<A>& a) {
  return a.isnan();
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> select(const Vectorized<A>& a, const Vectorized<A>& b, const Vectorized<A>& mask) {
  return Vectorized<A>::blendv(a, b, mask);
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> neg(const Vectorized<A>& a) {
  return a.neg();
}
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> absv(const Vectorized<A>& a) {
  return a.abs();
}
#endif

// 1 where mask is set, 0 elsewhere (mask: a comparison result, all bits per lane).
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> ones_where(const Vectorized<A>& mask) {
  return mask & Vectorized<A>(A(1));
}

// The entries of this level's KernelTable (csrc/kernels.h documents them), one per file.
double ofd(OfdMode mode, bool gs, bool gt, Dtype dtype, const void* s, const void* t, const void* g, void* os,
           void* ot, const void* m, int64_t numel, int64_t C, int64_t stride_c, double scale2);
void nd(Dtype dtype, const void* s, int64_t s_row, const void* t, int64_t t_row, const void* c, int64_t c_row,
        const int64_t* labels, const void* row_weight, double eps, int64_t B, int64_t D, void* rows, void* gs,
        int64_t gs_row, void* gt, int64_t gt_row);
void lsh_chunk(Dtype acc, bool use_codes, bool gs, void* Hs, const void* Ht, int64_t B, int64_t nc,
               const uint8_t* codes, int64_t code_row, int64_t n0, const void* bias, const void* w, double inv_n,
               double* bce_sum);
void lsh_rows(Dtype dtype, const void* fs, const void* ft, const void* w, void* rows, const double* bce_sum,
              double inv_n, double mse_weight, bool use_mse, const void* gacc, void* go_s, int64_t os_row,
              void* go_t, int64_t ot_row, int64_t B, int64_t D);
void sp_rows(Dtype acc, const void* as, const void* at, const void* w, int64_t b, bool l1, void* rows, void* das,
             void* dat);
void gram(Dtype acc, const void* q, int64_t ld, int64_t b, int64_t K, void* A);

}  // namespace CPU_CAPABILITY
}  // namespace kdk
