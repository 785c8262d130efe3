// Declarations of the fused CPU kernels (one .cpp per loss) and shared helpers.
#pragma once
// ATen only (no pybind11/autograd headers): the per-loss files compile faster;
// bindings.cpp includes <torch/extension.h> itself.
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <optional>
#include <vector>

#include "kernels.h"

namespace kdk {

using at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------- shared helpers
// Accumulation ("compute") type: double for double inputs, float for float,
// float16 and bfloat16 (half types are loaded, upcast, and computed in float).
template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

inline at::ScalarType compute_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A frozen operand in dtype `dtype`, contiguous (no copy when it already is).
inline Tensor contiguous_as(const Tensor& x, at::ScalarType dtype) {
  return x.scalar_type() == dtype ? x.contiguous() : x.to(dtype).contiguous();
}

// A 2-D [rows, cols] operand whose rows are read with a row stride: unit column
// stride is all the row kernels need, so only a transposed-like input is copied.
inline Tensor unit_inner_stride(const Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

// Output `out` (allocated like the input, as the fake kernels do) computed
// through a buffer with unit inner stride when `out` lacks one; call
// finish_output(out, work) after the kernel wrote `work`.
inline Tensor row_major_work(const Tensor& out) {
  return (out.size(1) <= 1 || out.stride(1) == 1) ? out : at::empty(out.sizes(), out.options());
}
inline void finish_output(Tensor& out, const Tensor& work) {
  if (!work.is_same(out)) out.copy_(work);
}

// Outputs of the kernels (output_cache.cpp). Of 4 MiB or more: from a cache of
// freed output blocks whose pages stay mapped (a fresh big block costs a page
// fault per 4 KiB), else plain at::empty_strided; either way with transparent
// huge-page advice on big fresh memory (KDKERNELS_HUGEPAGES=0 turns it off).
Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
Tensor empty_output_like(const Tensor& x);  // the strides at::empty_like(x) gives
int64_t output_cache_idle_bytes();
int64_t output_cache_limit();
void set_output_cache_limit(int64_t bytes);  // idle blocks beyond it are freed
void empty_output_cache();                   // frees the idle blocks

// The loops, from the kernel module of the ISA level kdkernels/_cpu.py chose
// (dispatch.cpp); kernels() raises until one is installed.
const KernelTable& kernels();
void install_kernels(const KernelTable* table);
Dtype kernel_dtype(at::ScalarType t);  // float, double, float16 or bfloat16

// GEMMs of LSH and SP (gemm.cpp), a [m, k], b [k, n], c [m, n]: float32
// through the engine gemm_engine() names (per call shape the faster of oneDNN and ATen), float64
// through ATen. The result is a new contiguous tensor, except that gemm_add
// may accumulate into c in place.
Tensor gemm(const Tensor& a, const Tensor& b);                      // a @ b
Tensor gemm_add(const Tensor& c, const Tensor& a, const Tensor& b);  // c + a @ b
// A = Q Q^T [b, b] for Q [b, K] (float or double): one GEMM, or for b <= 256 where
// that was faster for this shape, the kernel module's triangle kernel (half the flops).
Tensor gram(const Tensor& Q);
Tensor gram_kernel(const Tensor& Q);  // the triangle kernel alone (float or double Q)
// The faster of two equivalent ways to compute something, per (kind, key),
// timed on the key's first call (gemm.cpp) and fixed for the process; the
// choices and their times are listed by gemm_engine_reason().
using ShapeKey = std::array<int64_t, 7>;
struct TimedChoice {
  const char* name;    // unique per kind
  const char* first;   // what the two ways are called in the report
  const char* second;
  std::string (*describe)(const ShapeKey&);
};
bool timed_choice(const TimedChoice& kind, const ShapeKey& key, const std::function<void()>& first,
                  const std::function<void()>& second);
const char* gemm_engine();         // "per-shape", or "onednn" / "aten" when forced or the only one
std::string gemm_engine_reason();  // why (forced, or each call shape's choice and times so far)

// OFD (ofd.cpp)
TensorTriple ofd_forward(const Tensor& s, const Tensor& t, const Tensor& margin, double grad_scale,
                         bool need_grad_s, bool need_grad_t);
Tensor ofd_none(const Tensor& s, const Tensor& t, const Tensor& margin);
TensorPair ofd_backward(const Tensor& grad_d, const Tensor& s, const Tensor& t, const Tensor& margin,
                        bool need_grad_s, bool need_grad_t);
// ND (nd.cpp)
TensorTriple nd_forward(const Tensor& s, const Tensor& t, const Tensor& centers, const Tensor& labels,
                        const Tensor& row_weight, double eps, bool need_grad_s, bool need_grad_t);
// LSH (lsh.cpp)
TensorTriple lsh_forward(const Tensor& f_s, const c10::optional<Tensor>& f_t, const Tensor& weight,
                         const c10::optional<Tensor>& bias, const c10::optional<Tensor>& teacher_codes,
                         double mse_weight, const Tensor& row_weight, bool need_grad_s, bool need_grad_t);
// The autograd node of an eager reduced loss (autograd.cpp): `loss` (no history)
// gets a backward that returns grads[i] * upstream for inputs[i] (grads for a
// unit upstream gradient; numel 0: none); an input may be None.
Tensor attach_scaled_grads(Tensor loss, const std::vector<std::optional<Tensor>>& inputs, std::vector<Tensor> grads);
// SP (sp.cpp)
TensorTriple sp_forward(const Tensor& q_s, const Tensor& q_t, double p, const Tensor& row_weight,
                        bool need_grad_s, bool need_grad_t);

}  // namespace kdk
