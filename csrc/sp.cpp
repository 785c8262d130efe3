// SP (similarity preserving) on CPU: the GEMMs through gemm.cpp (the Gram matrices
// too: by the triangle kernel where that is faster), everything on the small [b, b] Gram
// matrices in one fused per-row pass.
//
//   A = Q Q^T, n_r = ||A_r||_p, den_r = max(n_r, 1e-12), G_r = A_r / den_r
//   rows_r = sum_j (G_t - G_s)[r, j]^2
// Gradient of sum_r w_r rows_r for one side (Dg = -2 w (G_t - G_s) for the
// student, +2 w (G_t - G_s) for the teacher), as autograd differentiates
// F.normalize (clamp_min passes the gradient where n_r >= eps; the p=2 norm
// has a zero gradient at n_r = 0; the p=1 norm's gradient is sign(A)):
//   gn_r = n_r >= eps ? -<Dg_r, G_r> / den_r : 0
//   dA_r = Dg_r / den_r + gn_r * (p == 2 ? A_r / n_r : sign(A_r))
//   dQ = (dA + dA^T) Q                     (one GEMM per side)
// The per-row pass is csrc/kernels/sp.cpp (one build per ISA level).
#include "kdkernels.h"

namespace kdk {
namespace {

// dA + dA^T, in place (dA [b, b] contiguous).
template <typename T>
void symmetrize(T* dA, int64_t b) {
  for (int64_t i = 0; i < b; ++i) {
    dA[i * b + i] *= 2;
    for (int64_t j = i + 1; j < b; ++j) dA[i * b + j] = dA[j * b + i] = dA[i * b + j] + dA[j * b + i];
  }
}

// grad of one side: (dA + dA^T) Q, allocated like the input q; dA is overwritten.
Tensor side_grad(Tensor& dA, const Tensor& Q, const Tensor& q) {
  if (dA.scalar_type() == at::kDouble) {
    symmetrize(dA.mutable_data_ptr<double>(), dA.size(0));
  } else {
    symmetrize(dA.mutable_data_ptr<float>(), dA.size(0));
  }
  Tensor g = gemm(dA, Q);
  if (g.strides() == q.strides() && g.scalar_type() == q.scalar_type()) return g;
  Tensor out = at::empty_like(q);
  out.copy_(g);
  return out;
}

}  // namespace

TensorTriple sp_forward(const Tensor& q_s, const Tensor& q_t, double p, const Tensor& row_weight,
                        bool need_grad_s, bool need_grad_t) {
  TORCH_CHECK(q_s.dim() == 2 && q_t.dim() == 2 && q_s.size(0) == q_t.size(0), "kdkernels sp: q_s/q_t must be [b, K]");
  TORCH_CHECK(p == 1.0 || p == 2.0, "kdkernels sp: p must be 1 or 2");
  const auto acc_type = compute_scalar_type(q_s.scalar_type());
  const int64_t b = q_s.size(0);
  TORCH_CHECK(row_weight.numel() == b && row_weight.scalar_type() == acc_type,
              "kdkernels sp: row_weight must be [b] in the compute dtype");
  const Tensor Qs = q_s.scalar_type() == acc_type ? q_s : q_s.to(acc_type);
  const Tensor Qt = q_t.scalar_type() == acc_type ? q_t : q_t.to(acc_type);
  const Tensor As = gram(Qs).contiguous();  // [b, b]
  const Tensor At = gram(Qt).contiguous();
  const Tensor w = row_weight.contiguous();
  Tensor rows = at::empty({b}, As.options());
  Tensor dAs = need_grad_s ? at::empty({b, b}, As.options()) : Tensor();
  Tensor dAt = need_grad_t ? at::empty({b, b}, As.options()) : Tensor();
  kernels().sp_rows(kernel_dtype(acc_type), As.const_data_ptr(), At.const_data_ptr(), w.const_data_ptr(), b,
                    p == 1.0, rows.mutable_data_ptr(), need_grad_s ? dAs.mutable_data_ptr() : nullptr,
                    need_grad_t ? dAt.mutable_data_ptr() : nullptr);
  Tensor grad_s = need_grad_s ? side_grad(dAs, Qs, q_s) : at::empty({0}, q_s.options());
  Tensor grad_t = need_grad_t ? side_grad(dAt, Qt, q_t) : at::empty({0}, q_t.options());
  return {rows, grad_s, grad_t};
}

}  // namespace kdk
