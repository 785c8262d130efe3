// ND (feature norm and direction) on CPU: one pass per row, parallel over rows.
//
// Row i (y = labels[i], c = centers[y], w = row_weight[i]):
//   cn = max(||c||, eps), se = <s_i, c> / cn          (e = c / cn, never materialised)
//   ns = ||s_i||, nt = ||t_i||, teacher wins if nt > ns or nt is NaN
//   den = max(winner, eps) (NaN propagates),  l_i = 1 - se / den
// Gradients of w * l_i, exactly as autograd differentiates the reference
// (clamp_min passes the gradient where winner >= eps; a zero norm has a zero
// gradient; where() sends it only to the winning norm):
//   gden = winner >= eps ? w se / den^2 : 0
//   grad_s = (-w / (den cn)) c + (student wins ? gden / ns : 0) s
//   grad_t = (teacher wins ? gden / nt : 0) t
// The four dot products (s.s, t.t, c.c, s.c) are read in one sweep with fixed
// lanes (deterministic), the scalars are combined in double, and a second sweep
// over the same (cached) row writes the gradients. The norms that decide the
// winner are summed accurately (see csrc/kernels/nd.cpp), so exact ties are
// found as ties.
// The loops are csrc/kernels/nd.cpp (one build per ISA level).
#include "kdkernels.h"

namespace kdk {

TensorTriple nd_forward(const Tensor& s, const Tensor& t, const Tensor& centers, const Tensor& labels,
                        const Tensor& row_weight, double eps, bool need_grad_s, bool need_grad_t) {
  TORCH_CHECK(s.dim() == 2 && t.sizes() == s.sizes() && centers.dim() == 2 && centers.size(1) == s.size(1),
              "kdkernels nd: shape mismatch");
  TORCH_CHECK(t.scalar_type() == s.scalar_type(), "kdkernels nd: s/t dtype mismatch");
  const int64_t B = s.size(0), D = s.size(1);
  const auto acc_type = compute_scalar_type(s.scalar_type());
  TORCH_CHECK(row_weight.numel() == B && row_weight.scalar_type() == acc_type,
              "kdkernels nd: row_weight must be [B] in the compute dtype");
  const Tensor s_u = unit_inner_stride(s), t_u = unit_inner_stride(t);
  const Tensor c_u = unit_inner_stride(centers.scalar_type() == s.scalar_type() ? centers
                                                                                 : centers.to(s.scalar_type()));
  const Tensor lab = labels.to(at::kLong).contiguous();
  const Tensor w = row_weight.contiguous();
  Tensor rows = at::empty({B}, s.options().dtype(acc_type));
  Tensor grad_s = need_grad_s ? empty_output_like(s) : at::empty({0}, s.options());
  Tensor grad_t = need_grad_t ? empty_output_like(t) : at::empty({0}, t.options());
  Tensor work_s = need_grad_s ? row_major_work(grad_s) : grad_s;
  Tensor work_t = need_grad_t ? row_major_work(grad_t) : grad_t;
  if (B > 0) {
    kernels().nd(kernel_dtype(s.scalar_type()), s_u.const_data_ptr(), s_u.stride(0), t_u.const_data_ptr(),
                 t_u.stride(0), c_u.const_data_ptr(), c_u.stride(0), lab.const_data_ptr<int64_t>(),
                 w.const_data_ptr(), eps, B, D, rows.mutable_data_ptr(),
                 need_grad_s ? work_s.mutable_data_ptr() : nullptr, need_grad_s ? work_s.stride(0) : 0,
                 need_grad_t ? work_t.mutable_data_ptr() : nullptr, need_grad_t ? work_t.stride(0) : 0);
  }
  if (need_grad_s) finish_output(grad_s, work_s);
  if (need_grad_t) finish_output(grad_t, work_t);
  return {rows, grad_s, grad_t};
}

}  // namespace kdk
