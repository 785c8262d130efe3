// SP (similarity preserving) on CPU: the GEMMs through gemm.cpp (the Gram matrices
// by blocks of their upper triangle), everything on the small [b, b] Gram
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
#include "kdkernels.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace kdk {
namespace {

constexpr double kSpEps = 1e-12;

template <typename A>
double row_norm(const A* a, int64_t b, bool l1) {
  double acc = 0.0;
  if (l1) {
    for (int64_t j = 0; j < b; ++j) acc += std::abs(static_cast<double>(a[j]));
    return static_cast<A>(acc);
  }
  for (int64_t j = 0; j < b; ++j) acc += static_cast<double>(a[j]) * static_cast<double>(a[j]);
  return static_cast<A>(std::sqrt(acc));
}

template <typename A>
double sgn(A x) {
  return static_cast<double>((x > A(0)) - (x < A(0)));
}

// dA for one row of one side: out[j] = Dg_j / den + gn * dnorm_j.
template <typename A>
void row_grad(const A* a, const A* g, const double* dg, double n, double den, int64_t b, bool l1, A* out) {
  double dot = 0.0;
  for (int64_t j = 0; j < b; ++j) dot += dg[j] * static_cast<double>(g[j]);
  const double gn = n >= kSpEps ? -dot / den : 0.0;
  for (int64_t j = 0; j < b; ++j) {
    const double dn = l1 ? sgn(a[j]) : (n == 0.0 ? 0.0 : static_cast<double>(a[j]) / n);
    out[j] = static_cast<A>(dg[j] / den + gn * dn);
  }
}

// Per-row pass over the Gram matrices as_, at_ [b, b]: rows, and dA for each
// side asked for (das/dat [b, b], may be null). Rows are independent.
template <typename A>
void sp_rows(const A* as_, const A* at_, const A* w, int64_t b, bool l1, A* rows, A* das, A* dat) {
  at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(b, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<A> gs(b), gt(b);
    std::vector<double> dg(b);
    for (int64_t r = r0; r < r1; ++r) {
      const A* as = as_ + r * b;
      const A* at = at_ + r * b;
      const double ns = row_norm(as, b, l1), nt = row_norm(at, b, l1);
      const A dens = static_cast<A>(ns < kSpEps ? kSpEps : ns);  // clamp_min: NaN stays NaN
      const A dent = static_cast<A>(nt < kSpEps ? kSpEps : nt);
      double sum = 0.0;
      for (int64_t j = 0; j < b; ++j) {
        gs[j] = as[j] / dens;
        gt[j] = at[j] / dent;
        const double diff = static_cast<double>(gt[j]) - static_cast<double>(gs[j]);
        dg[j] = diff;
        sum += diff * diff;
      }
      rows[r] = static_cast<A>(sum);
      if (das == nullptr && dat == nullptr) continue;
      const double two_w = 2.0 * static_cast<double>(w[r]);
      if (das != nullptr) {
        for (int64_t j = 0; j < b; ++j) dg[j] *= -two_w;  // Dg_s = -2 w (G_t - G_s)
        row_grad(as, gs.data(), dg.data(), ns, dens, b, l1, das + r * b);
        if (dat != nullptr)
          for (int64_t j = 0; j < b; ++j) dg[j] = -dg[j];  // Dg_t = -Dg_s
      } else {
        for (int64_t j = 0; j < b; ++j) dg[j] *= two_w;
      }
      if (dat != nullptr) row_grad(at, gt.data(), dg.data(), nt, dent, b, l1, dat + r * b);
    }
  });
}

// A = Q Q^T [b, b]. From b = 128 up, by 2 x 2 blocks, computing only the upper
// three (3/4 of the flops) and mirroring the off-diagonal block. With the
// oneDNN engine (fp32, 2 threads, b*K = 2^20) this was 20% faster than one
// GEMM at b = 256 and 512, the same at 128 and 4% slower at 64.
Tensor gram(const Tensor& Q) {
  const int64_t b = Q.size(0);
  if (b < 128) return gemm(Q, Q.t());
  const int64_t h = b / 2;
  Tensor A = at::empty({b, b}, Q.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor Q1 = Q.narrow(0, 0, h), Q2 = Q.narrow(0, h, b - h);
  Tensor A11 = A.narrow(0, 0, h).narrow(1, 0, h);
  Tensor A12 = A.narrow(0, 0, h).narrow(1, h, b - h);
  Tensor A22 = A.narrow(0, h, b - h).narrow(1, h, b - h);
  gemm_into(A11, Q1, Q1.t(), false);
  gemm_into(A12, Q1, Q2.t(), false);
  gemm_into(A22, Q2, Q2.t(), false);
  A.narrow(0, h, b - h).narrow(1, 0, h).copy_(A12.t());
  return A;
}

// grad of one side: (dA + dA^T) Q into a tensor allocated like the input q.
Tensor side_grad(const Tensor& dA, const Tensor& Q, const Tensor& q) {
  const Tensor M = dA + dA.t();
  Tensor out = at::empty_like(q);
  if (out.scalar_type() == Q.scalar_type()) {
    gemm_into(out, M, Q, false);
  } else {
    out.copy_(gemm(M, Q));
  }
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
  AT_DISPATCH_FLOATING_TYPES(acc_type, "kdkernels_sp_rows", [&] {
    sp_rows<scalar_t>(As.const_data_ptr<scalar_t>(), At.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b,
                      p == 1.0, rows.mutable_data_ptr<scalar_t>(),
                      need_grad_s ? dAs.mutable_data_ptr<scalar_t>() : nullptr,
                      need_grad_t ? dAt.mutable_data_ptr<scalar_t>() : nullptr);
  });
  Tensor grad_s = need_grad_s ? side_grad(dAs, Qs, q_s) : at::empty({0}, q_s.options());
  Tensor grad_t = need_grad_t ? side_grad(dAt, Qt, q_t) : at::empty({0}, q_t.options());
  return {rows, grad_s, grad_t};
}

}  // namespace kdk
