// LSH feature mimicking on CPU: the hash logits are streamed in column chunks
// of N, never held as [B, N].
//
// Per chunk of nc hash functions (W_c = weight[n0:n0+nc], [nc, D]):
//   [H_s; H_t] = [f_s; f_t] @ W_c^T             (one GEMM of [2B, D] or two of [B, D],
//                                                as was faster; H_s alone with codes)
//   fused pass per row (bias added here):
//     y = h_t > 0 (NaN h_t -> NaN y), or bit j of the packed teacher codes
//     bce = (1 - y) h_s - min(h_s, 0) + log1p(exp(-|h_s|))  (row sums in double)
//     dh  = w_i (sigmoid(h_s) - y) / N                      (in place over h_s)
//   grad_s += dh @ W_c                          (one GEMM, accumulating)
// then l_i = bce_i / N + mse_weight * mean_d (f_s - f_t)^2 and the MSE
// gradients +-2 mse_weight w_i (f_s - f_t) / D in a last per-row pass.
// grad_t comes from the MSE term only (y is piecewise constant in f_t and the
// reference detaches it, NaN included).
// The fused passes are csrc/kernels/lsh.cpp (one build per ISA level).
#include <ATen/Parallel.h>

#include "kdkernels.h"

#include <algorithm>
#include <vector>

namespace kdk {
namespace {

// Columns per chunk: the logits blocks ([R, nc] together, R = 2B or B) stay around 4 MiB (cache
// resident between the GEMM, the fused pass and the gradient GEMM; few enough
// chunks that the per-chunk GEMMs stay large), a multiple of 64 columns, and
// all of N when it fits.
int64_t chunk_columns(int64_t R, int64_t N, int64_t elem_size) {
  int64_t nc = (int64_t(4) << 20) / std::max<int64_t>(R * elem_size, 1);
  nc = std::max<int64_t>(256, std::min<int64_t>(nc, 8192)) / 64 * 64;
  return std::min(nc, N);
}

std::string stacked_key(const ShapeKey& k) {
  return "lsh projection [" + std::to_string(k[0]) + "," + std::to_string(k[1]) + "] x " + std::to_string(k[2]) +
         " columns" + (k[3] == 8 ? " f64" : "") + " @" + std::to_string(k[4]) + "t";
}
// key: B, D, chunk columns, element size, threads
const TimedChoice kStackedProjection{"lsh stacked", "stacked", "two GEMMs", stacked_key};

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
  const int64_t R = use_codes ? B : 2 * B;  // logit rows per chunk

  Tensor rows = at::empty({B}, acc_opts);
  Tensor grad_s = need_grad_s ? empty_output_like(f_s) : at::empty({0}, f_s.options());
  Tensor grad_t = need_grad_t ? empty_output_like(*f_t_opt) : at::empty({0}, f_s.options());
  Tensor Gs;  // the gradient accumulator, [B, D] in the compute dtype

  std::vector<double> bce_sum(B, 0.0);
  const double inv_n = 1.0 / static_cast<double>(N);

  if (B > 0 && N > 0) {
    const int64_t nc_max = chunk_columns(R, N, Fs.element_size());
    const Dtype acc = kernel_dtype(acc_type);
    const uint8_t* cp = use_codes ? codes.const_data_ptr<uint8_t>() : nullptr;
    const int64_t code_row = use_codes ? codes.stride(0) : 0;
    // Without codes, both logit blocks of a chunk come from one GEMM of the
    // stacked [f_s; f_t] ([2B, D], copied once), which streams W_c once, or
    // from two GEMMs of B rows, whichever was faster for this shape.
    const Tensor W0 = W.narrow(0, 0, nc_max).t();
    const bool stack = !use_codes && timed_choice(
        kStackedProjection, ShapeKey{B, D, nc_max, static_cast<int64_t>(Fs.element_size()), at::get_num_threads(), 0, 0},
        [&] { gemm(at::cat({Fs, Ft}), W0); }, [&] {
          gemm(Fs, W0);
          gemm(Ft, W0);
        });
    const Tensor X = stack ? at::cat({Fs, Ft}) : Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += nc_max) {
      const int64_t nc = std::min(nc_max, N - n0);
      const Tensor Wc = W.narrow(0, n0, nc);  // [nc, D]
      Tensor Hs, Ht;  // [B, nc] each, contiguous rows
      if (stack) {
        const Tensor H = gemm(X, Wc.t());
        Hs = H.narrow(0, 0, B);
        Ht = H.narrow(0, B, B);
      } else {
        Hs = gemm(Fs, Wc.t());
        if (!use_codes) Ht = gemm(Ft, Wc.t());
      }
      kernels().lsh_chunk(acc, use_codes, need_grad_s, Hs.mutable_data_ptr(),
                          use_codes ? nullptr : Ht.const_data_ptr(), B, nc, cp, code_row, n0,
                          has_bias ? bias.narrow(0, n0, nc).const_data_ptr() : nullptr, w.const_data_ptr(), inv_n,
                          bce_sum.data());
      if (need_grad_s) {
        Gs = n0 == 0 ? gemm(Hs, Wc) : gemm_add(Gs, Hs, Wc);  // Hs holds dH now
      }
    }
  } else if (need_grad_s) {
    Gs = at::zeros({B, D}, acc_opts);
  }

  // Last pass per row: the loss, the MSE term and the gradients' final form,
  // into the outputs themselves when they have unit inner stride (row_major_work
  // copies otherwise); grad_s is the accumulator itself when it can be.
  if (need_grad_s && grad_s.scalar_type() == acc_type && grad_s.strides() == Gs.strides()) grad_s = Gs;
  Tensor work_s = need_grad_s ? row_major_work(grad_s) : Tensor();
  Tensor work_t = need_grad_t ? row_major_work(grad_t) : Tensor();
  kernels().lsh_rows(kernel_dtype(f_s.scalar_type()), Fs.const_data_ptr(), has_ft ? Ft.const_data_ptr() : nullptr,
                     w.const_data_ptr(), rows.mutable_data_ptr(), bce_sum.data(), inv_n, mse_weight, use_mse,
                     need_grad_s ? Gs.const_data_ptr() : nullptr, need_grad_s ? work_s.mutable_data_ptr() : nullptr,
                     need_grad_s ? work_s.stride(0) : 0, need_grad_t ? work_t.mutable_data_ptr() : nullptr,
                     need_grad_t ? work_t.stride(0) : 0, B, D);
  if (need_grad_s) finish_output(grad_s, work_s);
  if (need_grad_t) finish_output(grad_t, work_t);
  return {rows, grad_s, grad_t};
}

}  // namespace kdk
