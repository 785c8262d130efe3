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
// The loop itself is csrc/kernels/ofd.cpp (one build per ISA level).
#include "kdkernels.h"

#include <algorithm>

namespace kdk {
namespace {

// x in the strides of `layout` (a dense tensor of the same shape), copying only
// when its strides differ.
Tensor alloc_in_layout(const Tensor& layout, const at::TensorOptions& options) {
  return empty_output(layout.sizes(), layout.strides(), options);
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
  Tensor out = empty_output_like(x);
  if (out.strides() == layout.strides()) return {out, out};
  return {out, alloc_in_layout(layout, x.options())};
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
    total = kernels().ofd(OfdMode::kForward, need_grad_s, need_grad_t, kernel_dtype(s.scalar_type()),
                          s_l.const_data_ptr(), t_l.const_data_ptr(), nullptr,
                          need_grad_s ? work_s.mutable_data_ptr() : nullptr,
                          need_grad_t ? work_t.mutable_data_ptr() : nullptr, margin.const_data_ptr(), numel, L.C,
                          L.stride_c, 2.0 * grad_scale);
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
  const Tensor s_l = in_layout(s, L.layout);
  const Tensor t_l = in_layout(t, L.layout);
  const int64_t numel = s.numel();
  if (numel > 0) {
    kernels().ofd(OfdMode::kNone, false, false, kernel_dtype(s.scalar_type()), s_l.const_data_ptr(),
                  t_l.const_data_ptr(), nullptr, d.mutable_data_ptr(), nullptr, margin.const_data_ptr(), numel, L.C,
                  L.stride_c, 0.0);
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
    kernels().ofd(OfdMode::kBackward, need_grad_s, need_grad_t, kernel_dtype(s.scalar_type()),
                  s_l.const_data_ptr(), t_l.const_data_ptr(), g_l.const_data_ptr(),
                  need_grad_s ? work_s.mutable_data_ptr() : nullptr, need_grad_t ? work_t.mutable_data_ptr() : nullptr,
                  margin.const_data_ptr(), numel, L.C, L.stride_c, 0.0);
  }
  finish_output(grad_s, work_s);
  finish_output(grad_t, work_t);
  return {grad_s, grad_t};
}

}  // namespace kdk
