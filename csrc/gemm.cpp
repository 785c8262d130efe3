// The GEMMs of the LSH and SP kernels: one engine per process for float32,
// the faster of the two that torch has on this machine.
//
//   "onednn": torch's registered op mkldnn::_linear_pointwise (and its .binary
//             overload for c + a @ b), called through the c10 dispatcher: the
//             oneDNN kernels built into libtorch_cpu;
//   "aten":   at::mm / at::addmm (MKL or OpenBLAS, as torch.mm).
//
// Why: torch.mm in float32 is MKL, which on AMD CPUs runs a generic code path
// (measured at 40-60% of oneDNN's speed on Zen 3 and Zen 5), while on Intel
// CPUs the two are close. So the first float32 GEMM measures both on one
// small product (checking oneDNN's result against ATen's) and keeps the faster
// one for the process. KDKERNELS_GEMM=aten or =onednn forces an engine;
// torch.backends.mkldnn.enabled = False sends every call to ATen. float64
// always uses ATen (oneDNN has no float64 GEMM). Both are plain float32 GEMMs
// with float32 accumulation; oneDNN follows torch's float32 matmul precision
// setting as torch.mm does.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "kdkernels.h"

namespace kdk {
namespace {

struct OneDnn {
  c10::OperatorHandle linear;  // _linear_pointwise(X, W, B?, attr, scalars, algorithm): X @ W^T
  c10::OperatorHandle binary;  // _linear_pointwise.binary(X, other, W, B?, attr): X @ W^T (attr) other
};

std::optional<OneDnn> find_onednn() {
  if (!at::hasMKLDNN()) return std::nullopt;
  auto& d = c10::Dispatcher::singleton();
  auto linear = d.findSchema({"mkldnn::_linear_pointwise", ""});
  auto binary = d.findSchema({"mkldnn::_linear_pointwise", "binary"});
  if (!linear || !binary) return std::nullopt;
  return OneDnn{*linear, *binary};
}

Tensor call(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

// a [m, k] @ b [k, n] as linear(a, b^T); c + a @ b by the fused "add".
Tensor onednn_mm(const OneDnn& o, const Tensor& a, const Tensor& b) {
  return call(o.linear, {a.contiguous(), b.t(), c10::IValue(), std::string("none"),
                         c10::List<std::optional<c10::Scalar>>(), c10::IValue()});
}
Tensor onednn_addmm(const OneDnn& o, const Tensor& c, const Tensor& a, const Tensor& b) {
  return call(o.binary, {a.contiguous(), c.contiguous(), b.t(), c10::IValue(), std::string("add")});
}

double best_ms(const std::function<void()>& f, int reps) {
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

struct Engine {
  std::optional<OneDnn> onednn;  // set when float32 GEMMs go to oneDNN
  std::string name;
  std::string why;
};

Engine choose_engine() {
  const char* forced = std::getenv("KDKERNELS_GEMM");
  const std::string want = forced != nullptr ? forced : "";
  TORCH_CHECK(want.empty() || want == "aten" || want == "onednn",
              "KDKERNELS_GEMM must be 'aten' or 'onednn' (or unset), got '", want, "'");
  if (want == "aten") return {std::nullopt, "aten", "forced by KDKERNELS_GEMM"};
  std::optional<OneDnn> o = find_onednn();
  if (!o) {
    TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: this torch has no mkldnn::_linear_pointwise");
    return {std::nullopt, "aten", "torch has no mkldnn::_linear_pointwise"};
  }
  // One small product of the LSH kind: check oneDNN's result, then time both.
  // (deterministic values: the global random generator is the user's)
  const Tensor a = at::arange(256 * 512, at::kFloat).mul_(0.37f).sin_().view({256, 512});
  const Tensor b = at::arange(512 * 1024, at::kFloat).mul_(0.73f).cos_().view({512, 1024});
  try {
    if (!at::allclose(onednn_mm(*o, a, b), at::mm(a, b), 1e-4, 1e-3)) {
      TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: oneDNN's product differs from ATen's");
      return {std::nullopt, "aten", "oneDNN's product differs from ATen's"};
    }
  } catch (const c10::Error& e) {
    TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: oneDNN refused float32: ", e.what_without_backtrace());
    return {std::nullopt, "aten", "oneDNN refused float32"};
  }
  if (want == "onednn") return {o, "onednn", "forced by KDKERNELS_GEMM"};
  double t_dnn = 1e300, t_aten = 1e300;
  for (int round = 0; round < 3; ++round) {  // interleaved, best of each
    t_dnn = std::min(t_dnn, best_ms([&] { onednn_mm(*o, a, b); }, 2));
    t_aten = std::min(t_aten, best_ms([&] { at::mm(a, b); }, 2));
  }
  const std::string times = "256x512x1024: oneDNN " + std::to_string(t_dnn) + " ms, ATen " +
                            std::to_string(t_aten) + " ms";
  if (t_dnn <= t_aten) return {o, "onednn", "measured faster (" + times + ")"};
  return {std::nullopt, "aten", "measured faster (" + times + ")"};
}

const Engine& engine() {
  static const Engine e = choose_engine();
  return e;
}

const OneDnn* onednn_for(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || a.numel() == 0 || b.numel() == 0) {
    return nullptr;
  }
  const Engine& e = engine();
  return e.onednn && at::globalContext().userEnabledMkldnn() ? &*e.onednn : nullptr;
}

}  // namespace

const char* gemm_engine() { return engine().name.c_str(); }
const char* gemm_engine_reason() { return engine().why.c_str(); }

Tensor gemm(const Tensor& a, const Tensor& b) {
  if (const OneDnn* o = onednn_for(a, b)) return onednn_mm(*o, a, b);
  return at::mm(a, b).contiguous();
}

Tensor gemm_add(const Tensor& c, const Tensor& a, const Tensor& b) {
  if (const OneDnn* o = onednn_for(a, b)) return onednn_addmm(*o, c, a, b);
  Tensor out = c;
  return out.addmm_(a, b);
}

}  // namespace kdk
