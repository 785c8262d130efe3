// OFD's single pass (math and layout: csrc/ofd.cpp), one vector of the compute
// type at a time. float16/bfloat16 runs go through float tiles.
#include <vector>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 16384;  // elements per deterministic partial sum
constexpr int64_t kFlush = 1024;   // float lanes are flushed to double this often
constexpr int64_t kStreamBytes = int64_t(32) << 20;  // outputs of this size or more: streaming stores

// One run of n elements sharing the margin pointer m: m[0] for every element
// (MV = false, a run inside one channel) or m[i] for element i (MV = true).
//   kForward:  acc += d; os = scale2 * dd/ds; ot = scale2 * dd/dt
//   kNone:     os = d
//   kBackward: os = 2 g dd/ds; ot = 2 g dd/dt
template <OfdMode M, bool GS, bool GT, bool MV, typename A>
C10_ALWAYS_INLINE void ofd_run(const A* __restrict s, const A* __restrict t, const A* __restrict g,
                               A* __restrict os, A* __restrict ot, const A* __restrict m, int64_t n, A scale2,
                               bool stream, Vectorized<A>& acc) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V zero(A(0)), vscale2(scale2), two(A(2)), m0(m[0]);
  auto step = [&](int64_t i, int64_t k) {  // elements i .. i + k - 1, k <= W
    const V sv = load(s + i, k), tv = load(t + i, k);
    const V mv = MV ? load(m + i, k) : m0;
    const V keep = gt(tv, mv) | isnan_mask(tv);
    const V tc = select(mv, tv, keep);
    const V diff = sv - tc;
    const V dm = diff * ones_where(gt(sv, tc) | gt(tc, zero));  // a product: NaN stays NaN
    auto put = [&](A* p, const V& v) { stream ? store_stream(p, v, k) : store(p, v, k); };
    if constexpr (M == OfdMode::kNone) {
      put(os + i, diff * dm);
    } else {
      const V gsv = (M == OfdMode::kBackward ? load(g + i, k) * two : vscale2) * dm;
      if constexpr (GS) put(os + i, gsv);
      if constexpr (GT) put(ot + i, neg(gsv) & keep);
      if constexpr (M == OfdMode::kForward) acc += first(diff * dm, k);
    }
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) step(i, W);
  if (i < n) step(i, n - i);
}

// A run of T elements: directly when T is the compute type, else by float tiles.
template <OfdMode M, bool GS, bool GT, bool MV, typename T>
C10_ALWAYS_INLINE void ofd_run_t(const T* s, const T* t, const T* g, T* os, T* ot, const acc_t<T>* m, int64_t n,
                                 acc_t<T> scale2, bool stream, Vectorized<acc_t<T>>& acc) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    ofd_run<M, GS, GT, MV, A>(s, t, g, os, ot, m, n, scale2, stream, acc);
  } else {
    __at_align__ A sb[kTile], tb[kTile], gb[kTile], osb[kTile], otb[kTile];
    for (int64_t k = 0; k < n; k += kTile) {
      const int64_t len = std::min(kTile, n - k);
      const A* gp = M == OfdMode::kBackward ? as_acc(g + k, gb, len) : nullptr;
      ofd_run<M, GS, GT, MV, A>(as_acc(s + k, sb, len), as_acc(t + k, tb, len), gp, osb, otb, MV ? m + k : m,
                                len, scale2, false, acc);
      if (GS || M == OfdMode::kNone) at::vec::convert(osb, os + k, len);
      if (GT) at::vec::convert(otb, ot + k, len);
    }
  }
}

// The whole tensor in memory order; returns the sum of d (kForward only).
template <OfdMode M, bool GS, bool GT, typename T>
double ofd_dense(const T* s, const T* t, const T* g, T* os, T* ot, const acc_t<T>* m, int64_t numel, int64_t C,
                 int64_t stride_c, double scale2_d) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const A scale2 = static_cast<A>(scale2_d);
  if (C == 1) stride_c = numel;  // one channel: the whole tensor is one run
  const bool vec_m = stride_c == 1;
  // outputs bigger than the caches are written with streaming stores
  const bool stream = numel * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  const int64_t nblocks = (numel + kBlock - 1) / kBlock;
  std::vector<double> partial(M == OfdMode::kForward ? nblocks : 0, 0.0);
  at::parallel_for(0, nblocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t begin = blk * kBlock;
      const int64_t end = std::min(numel, begin + kBlock);
      V acc(A(0));
      double block_sum = 0.0;
      int64_t since_flush = 0;
      for (int64_t off = begin; off < end;) {
        const int64_t q = off / stride_c;
        const int64_t c = q % C;
        const int64_t run_end = vec_m ? std::min(end, off + (C - c)) : std::min(end, (q + 1) * stride_c);
        const int64_t n = run_end - off;
        const T* gp = M == OfdMode::kBackward ? g + off : nullptr;
        T* osp = (GS || M == OfdMode::kNone) ? os + off : nullptr;
        T* otp = GT ? ot + off : nullptr;
        if (vec_m) {
          ofd_run_t<M, GS, GT, true, T>(s + off, t + off, gp, osp, otp, m + c, n, scale2, stream, acc);
        } else {
          ofd_run_t<M, GS, GT, false, T>(s + off, t + off, gp, osp, otp, m + c, n, scale2, stream, acc);
        }
        if constexpr (M == OfdMode::kForward && !std::is_same_v<A, double>) {
          if ((since_flush += n) >= kFlush) {
            add_lanes(block_sum, acc);
            acc = V(A(0));
            since_flush = 0;
          }
        }
        off = run_end;
      }
      if constexpr (M == OfdMode::kForward) {
        add_lanes(block_sum, acc);
        partial[blk] = block_sum;
      }
    }
    if (stream) stream_fence();
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <OfdMode M, typename T>
double ofd_flags(bool gs, bool gt, const T* s, const T* t, const T* g, T* os, T* ot, const acc_t<T>* m,
                 int64_t numel, int64_t C, int64_t stride_c, double scale2) {
  if (gs && gt) return ofd_dense<M, true, true, T>(s, t, g, os, ot, m, numel, C, stride_c, scale2);
  if (gs) return ofd_dense<M, true, false, T>(s, t, g, os, ot, m, numel, C, stride_c, scale2);
  if (gt) return ofd_dense<M, false, true, T>(s, t, g, os, ot, m, numel, C, stride_c, scale2);
  return ofd_dense<M, false, false, T>(s, t, g, os, ot, m, numel, C, stride_c, scale2);
}

}  // namespace

double ofd(OfdMode mode, bool gs, bool gt, Dtype dtype, const void* s, const void* t, const void* g, void* os,
           void* ot, const void* m, int64_t numel, int64_t C, int64_t stride_c, double scale2) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* sp = static_cast<const T*>(s);
    const T* tp = static_cast<const T*>(t);
    const T* gp = static_cast<const T*>(g);
    T* osp = static_cast<T*>(os);
    T* otp = static_cast<T*>(ot);
    const auto* mp = static_cast<const acc_t<T>*>(m);
    switch (mode) {
      case OfdMode::kNone:
        return ofd_flags<OfdMode::kNone, T>(false, false, sp, tp, gp, osp, otp, mp, numel, C, stride_c, scale2);
      case OfdMode::kBackward:
        return ofd_flags<OfdMode::kBackward, T>(gs, gt, sp, tp, gp, osp, otp, mp, numel, C, stride_c, scale2);
      case OfdMode::kForward:
        break;
    }
    return ofd_flags<OfdMode::kForward, T>(gs, gt, sp, tp, gp, osp, otp, mp, numel, C, stride_c, scale2);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdk
