// OFD (partial L2 with margin ReLU) on CPU: one memory-order pass over s, t.
//
//   t' = t > m_c || isnan(t) ? t : m_c          (channel dim 1)
//   mask = (s > t') || (t' > 0)                 (applied as a product: NaN stays NaN)
//   d = (s - t')^2 * mask
//   dd/ds = 2 (s - t') mask,  dd/dt = -dd/ds where t > m_c or t is NaN, else 0
//
// Layout: every tensor the kernel touches shares the strides of
// at::empty_like(s) (a dense layout: contiguous, channels_last, or s's own
// dense permutation), so the kernel walks memory linearly and finds the
// channel of offset o as (o / stride_c) % C. Inputs in another layout are
// copied into that one first; outputs asked for in another layout (grad_t when
// t's layout differs from s's) are copied out at the end.
//
// The sum is deterministic: fixed blocks of kBlock elements (independent of the
// thread count), per-block sums in fixed-order lanes flushed to double, and the
// block partials added in order.
#include "kdkernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace kdk {
namespace {

constexpr int64_t kBlock = 16384;  // elements per deterministic partial sum
constexpr int kLanes = 16;         // independent accumulators (a vector register or two)
constexpr int64_t kFlush = 1024;   // float lanes are flushed to double this often

enum class Mode { kForward, kNone, kBackward };

// One run of n elements that share the margin pointer m: m[0] for every
// element (MV = false, a run inside one channel) or m[i] for element i
// (MV = true, consecutive channels: stride_c == 1).
//   kForward:  lanes += d; os = scale2 * dd/ds; ot = scale2 * dd/dt
//   kNone:     os = d
//   kBackward: os = g * dd/ds; ot = g * dd/dt
template <Mode M, bool GS, bool GT, bool MV, typename T>
C10_ALWAYS_INLINE void ofd_run(const T* __restrict s, const T* __restrict t, const T* __restrict g,
                               T* __restrict os, T* __restrict ot, const acc_t<T>* __restrict m, int64_t n,
                               acc_t<T> scale2, acc_t<T>* __restrict lanes_io) {
  using A = acc_t<T>;
  A lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = lanes_io[j];
  const A m0 = m[0];
  auto elem = [&](int64_t i) -> A {
    const A sv = static_cast<A>(s[i]);
    const A tv = static_cast<A>(t[i]);
    const A mv = MV ? m[i] : m0;
    const bool keep = (tv > mv) | (tv != tv);
    const A tc = keep ? tv : mv;
    const A diff = sv - tc;
    const A mask = ((sv > tc) | (tc > A(0))) ? A(1) : A(0);
    const A dm = diff * mask;
    if constexpr (M == Mode::kNone) {
      os[i] = static_cast<T>(diff * dm);
      return A(0);
    } else {
      const A gsv = (M == Mode::kBackward ? static_cast<A>(g[i]) * A(2) : scale2) * dm;
      if constexpr (GS) os[i] = static_cast<T>(gsv);
      if constexpr (GT) ot[i] = static_cast<T>(keep ? -gsv : A(0));
      return diff * dm;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A d = elem(i + j);
      if constexpr (M == Mode::kForward) lanes[j] += d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const A d = elem(i);
    if constexpr (M == Mode::kForward) lanes[j] += d;
  }
  for (int j = 0; j < kLanes; ++j) lanes_io[j] = lanes[j];
}

// The whole tensor in memory order; returns the sum of d (kForward only).
// Pointers that a mode/flag combination does not use may be null.
template <Mode M, bool GS, bool GT, typename T>
double ofd_dense(const T* s, const T* t, const T* g, T* os, T* ot, const acc_t<T>* m, int64_t numel,
                 int64_t C, int64_t stride_c, double scale2_d) {
  using A = acc_t<T>;
  const A scale2 = static_cast<A>(scale2_d);
  if (C == 1) stride_c = numel;  // one channel: the whole tensor is one run
  const int64_t nblocks = (numel + kBlock - 1) / kBlock;
  std::vector<double> partial(M == Mode::kForward ? nblocks : 0, 0.0);
  at::parallel_for(0, nblocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t begin = blk * kBlock;
      const int64_t end = std::min(numel, begin + kBlock);
      A lanes[kLanes] = {};
      double block_sum = 0.0;
      int64_t since_flush = 0;
      auto flush = [&]() {
        for (int j = 0; j < kLanes; ++j) {
          block_sum += static_cast<double>(lanes[j]);
          lanes[j] = A(0);
        }
        since_flush = 0;
      };
      int64_t off = begin;
      while (off < end) {
        const int64_t q = off / stride_c;
        const int64_t c = q % C;
        const bool vec_m = stride_c == 1;
        const int64_t run_end = vec_m ? std::min(end, off + (C - c)) : std::min(end, (q + 1) * stride_c);
        const int64_t n = run_end - off;
        const T* gp = M == Mode::kBackward ? g + off : nullptr;
        T* osp = (GS || M == Mode::kNone) ? os + off : nullptr;
        T* otp = GT ? ot + off : nullptr;
        if (vec_m) {
          ofd_run<M, GS, GT, true, T>(s + off, t + off, gp, osp, otp, m + c, n, scale2, lanes);
        } else {
          ofd_run<M, GS, GT, false, T>(s + off, t + off, gp, osp, otp, m + c, n, scale2, lanes);
        }
        if constexpr (M == Mode::kForward && !std::is_same<A, double>::value) {
          since_flush += n;
          if (since_flush >= kFlush) flush();
        }
        off = run_end;
      }
      if constexpr (M == Mode::kForward) {
        flush();
        partial[blk] = block_sum;
      }
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// x in the strides of `layout` (a dense tensor of the same shape), copying only
// when its strides differ.
Tensor alloc_in_layout(const Tensor& layout, const at::TensorOptions& options) {
  return at::empty_strided(layout.sizes(), layout.strides(), options);
}

Tensor in_layout(const Tensor& x, const Tensor& layout) {
  if (x.strides() == layout.strides()) return x;
  Tensor y = alloc_in_layout(layout, x.options());
  y.copy_(x);
  return y;
}

// Output tensor for a gradient of `x` (the fake kernels give empty_like(x)) and
// the buffer the kernel writes, which has the kernel's layout.
std::pair<Tensor, Tensor> grad_output(const Tensor& x, const Tensor& layout, bool wanted) {
  if (!wanted) {
    Tensor e = at::empty({0}, x.options());
    return {e, e};
  }
  Tensor out = at::empty_like(x);
  if (out.strides() == layout.strides()) {
    advise_huge_pages(out);
    return {out, out};
  }
  Tensor work = alloc_in_layout(layout, x.options());
  advise_huge_pages(work);
  return {out, work};
}

struct OfdLayout {
  Tensor layout;  // a meta tensor (no memory): shape of s, strides of empty_like(s)
  int64_t C;
  int64_t stride_c;
};

OfdLayout ofd_layout(const Tensor& s, const Tensor& margin) {
  TORCH_CHECK(s.dim() >= 2, "kdkernels ofd: s needs at least 2 dims");
  TORCH_CHECK(margin.is_contiguous() && margin.numel() == s.size(1) &&
                  margin.scalar_type() == compute_scalar_type(s.scalar_type()),
              "kdkernels ofd: margin must be contiguous [C] in the compute dtype");
  // A meta tensor: the strides empty_like(s) gives, without allocating (an
  // untouched buffer per call would also make glibc hand the outputs fresh,
  // page-faulting memory).
  Tensor layout = at::empty_like(s, s.options().device(at::kMeta));
  TORCH_CHECK(layout.is_non_overlapping_and_dense(), "kdkernels ofd: empty_like(s) is not dense");
  return {layout, s.size(1), std::max<int64_t>(layout.stride(1), 1)};
}

}  // namespace

TensorTriple ofd_forward(const Tensor& s, const Tensor& t, const Tensor& margin, double grad_scale,
                         bool need_grad_s, bool need_grad_t) {
  TORCH_CHECK(s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(), "kdkernels ofd: s/t mismatch");
  const OfdLayout L = ofd_layout(s, margin);
  auto [grad_s, work_s] = grad_output(s, L.layout, need_grad_s);
  auto [grad_t, work_t] = grad_output(t, L.layout, need_grad_t);
  const Tensor s_l = in_layout(s, L.layout);
  const Tensor t_l = in_layout(t, L.layout);
  const auto acc_type = compute_scalar_type(s.scalar_type());
  double total = 0.0;
  const int64_t numel = s.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdkernels_ofd_forward", [&] {
      const scalar_t* sp = s_l.const_data_ptr<scalar_t>();
      const scalar_t* tp = t_l.const_data_ptr<scalar_t>();
      scalar_t* gsp = need_grad_s ? work_s.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gtp = need_grad_t ? work_t.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t<scalar_t>* mp = margin.const_data_ptr<acc_t<scalar_t>>();
      const double scale2 = 2.0 * grad_scale;
      constexpr Mode F = Mode::kForward;
      if (need_grad_s && need_grad_t) {
        total = ofd_dense<F, true, true, scalar_t>(sp, tp, nullptr, gsp, gtp, mp, numel, L.C, L.stride_c, scale2);
      } else if (need_grad_s) {
        total = ofd_dense<F, true, false, scalar_t>(sp, tp, nullptr, gsp, gtp, mp, numel, L.C, L.stride_c, scale2);
      } else if (need_grad_t) {
        total = ofd_dense<F, false, true, scalar_t>(sp, tp, nullptr, gsp, gtp, mp, numel, L.C, L.stride_c, scale2);
      } else {
        total = ofd_dense<F, false, false, scalar_t>(sp, tp, nullptr, gsp, gtp, mp, numel, L.C, L.stride_c, scale2);
      }
    });
  }
  finish_output(grad_s, work_s);
  finish_output(grad_t, work_t);
  Tensor total_t = at::scalar_tensor(total, s.options().dtype(acc_type));
  return {total_t, grad_s, grad_t};
}

Tensor ofd_none(const Tensor& s, const Tensor& t, const Tensor& margin) {
  TORCH_CHECK(s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(), "kdkernels ofd: s/t mismatch");
  const OfdLayout L = ofd_layout(s, margin);
  Tensor d = alloc_in_layout(L.layout, s.options());  // empty_like(s)
  advise_huge_pages(d);
  const Tensor s_l = in_layout(s, L.layout);
  const Tensor t_l = in_layout(t, L.layout);
  const int64_t numel = s.numel();
  if (numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdkernels_ofd_none", [&] {
      ofd_dense<Mode::kNone, false, false, scalar_t>(s_l.const_data_ptr<scalar_t>(), t_l.const_data_ptr<scalar_t>(),
                                           nullptr, d.mutable_data_ptr<scalar_t>(), nullptr,
                                           margin.const_data_ptr<acc_t<scalar_t>>(), numel, L.C, L.stride_c,
                                           0.0);
    });
  }
  return d;
}

TensorPair ofd_backward(const Tensor& grad_d, const Tensor& s, const Tensor& t, const Tensor& margin,
                        bool need_grad_s, bool need_grad_t) {
  TORCH_CHECK(s.sizes() == t.sizes() && s.scalar_type() == t.scalar_type(), "kdkernels ofd: s/t mismatch");
  TORCH_CHECK(grad_d.sizes() == s.sizes(), "kdkernels ofd: grad_d must have the shape of s");
  const OfdLayout L = ofd_layout(s, margin);
  auto [grad_s, work_s] = grad_output(s, L.layout, need_grad_s);
  auto [grad_t, work_t] = grad_output(t, L.layout, need_grad_t);
  const int64_t numel = s.numel();
  if (numel > 0 && (need_grad_s || need_grad_t)) {
    const Tensor s_l = in_layout(s, L.layout);
    const Tensor t_l = in_layout(t, L.layout);
    Tensor g_l = grad_d.scalar_type() == s.scalar_type() ? in_layout(grad_d, L.layout)
                                                         : in_layout(grad_d.to(s.scalar_type()), L.layout);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kdkernels_ofd_backward", [&] {
      const scalar_t* sp = s_l.const_data_ptr<scalar_t>();
      const scalar_t* tp = t_l.const_data_ptr<scalar_t>();
      const scalar_t* gp = g_l.const_data_ptr<scalar_t>();
      scalar_t* gsp = need_grad_s ? work_s.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gtp = need_grad_t ? work_t.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t<scalar_t>* mp = margin.const_data_ptr<acc_t<scalar_t>>();
      constexpr Mode B = Mode::kBackward;
      if (need_grad_s && need_grad_t) {
        ofd_dense<B, true, true, scalar_t>(sp, tp, gp, gsp, gtp, mp, numel, L.C, L.stride_c, 0.0);
      } else if (need_grad_s) {
        ofd_dense<B, true, false, scalar_t>(sp, tp, gp, gsp, gtp, mp, numel, L.C, L.stride_c, 0.0);
      } else {
        ofd_dense<B, false, true, scalar_t>(sp, tp, gp, gsp, gtp, mp, numel, L.C, L.stride_c, 0.0);
      }
    });
  }
  finish_output(grad_s, work_s);
  finish_output(grad_t, work_t);
  return {grad_s, grad_t};
}

}  // namespace kdk
