// The GEMMs of the LSH and SP kernels: for float32, the faster of the two
// engines torch has on this machine, chosen per call shape; SP's Gram
// matrices, by a triangle kernel or one GEMM as was faster; and the timed choices behind both.
//
//   "onednn": torch's registered op mkldnn::_linear_pointwise (and its .binary
//             overload for c + a @ b), called through the c10 dispatcher: the
//             oneDNN kernels built into libtorch_cpu;
//   "aten":   at::mm / at::addmm (MKL or OpenBLAS, as torch.mm).
//
// Why: torch.mm in float32 is MKL, which on AMD CPUs runs a generic code path
// (measured at 40-60% of oneDNN's speed on Zen 3 and Zen 5), while on Intel
// CPUs the two are close and each wins on some shapes (Intel Xeon, 1 thread:
// oneDNN took 0.67x MKL's time for SP's Gram Q Q^T [64,16384]x[16384,64], MKL
// 0.74x oneDNN's for (dA + dA^T) Q [64,64]x[64,16384], whose transposed weight
// oneDNN reorders). So the first float32 GEMM checks oneDNN's result against
// ATen's on a small product, and the first call of each call shape (m, k, n,
// the operands' layouts, accumulate or not, intra-op threads) times both
// engines on the call's own operands (see timed_choice below)
// and keeps the faster one for that shape for the rest of the process; the
// result is then computed by that engine, so every call of a shape gives the
// same bits. KDKERNELS_GEMM=aten or =onednn forces an engine;
// torch.backends.mkldnn.enabled = False sends every call to ATen. float64
// always uses ATen (oneDNN has no float64 GEMM). Both are plain float32 GEMMs
// with float32 accumulation; oneDNN follows torch's float32 matmul precision
// setting as torch.mm does.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
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
  std::optional<OneDnn> onednn;  // set when float32 GEMMs may go to oneDNN
  bool per_shape;                // choose per call shape (else oneDNN whenever it is set)
  std::string name;
  std::string why;
};

Engine choose_engine() {
  const char* forced = std::getenv("KDKERNELS_GEMM");
  const std::string want = forced != nullptr ? forced : "";
  TORCH_CHECK(want.empty() || want == "aten" || want == "onednn",
              "KDKERNELS_GEMM must be 'aten' or 'onednn' (or unset), got '", want, "'");
  if (want == "aten") return {std::nullopt, false, "aten", "forced by KDKERNELS_GEMM"};
  std::optional<OneDnn> o = find_onednn();
  if (!o) {
    TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: this torch has no mkldnn::_linear_pointwise");
    return {std::nullopt, false, "aten", "torch has no mkldnn::_linear_pointwise"};
  }
  // One small product: oneDNN's result must match ATen's.
  // (deterministic values: the global random generator is the user's)
  const Tensor a = at::arange(64 * 96, at::kFloat).mul_(0.37f).sin_().view({64, 96});
  const Tensor b = at::arange(96 * 80, at::kFloat).mul_(0.73f).cos_().view({96, 80});
  try {
    if (!at::allclose(onednn_mm(*o, a, b), at::mm(a, b), 1e-4, 1e-3)) {
      TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: oneDNN's product differs from ATen's");
      return {std::nullopt, false, "aten", "oneDNN's product differs from ATen's"};
    }
  } catch (const c10::Error& e) {
    TORCH_CHECK(want.empty(), "KDKERNELS_GEMM=onednn: oneDNN refused float32: ", e.what_without_backtrace());
    return {std::nullopt, false, "aten", "oneDNN refused float32"};
  }
  if (want == "onednn") return {o, false, "onednn", "forced by KDKERNELS_GEMM"};
  return {o, true, "per-shape",
          "the faster of oneDNN and ATen for each call shape, timed on its first call"};
}

const Engine& engine() {
  static const Engine e = choose_engine();
  return e;
}

// Timed choices between two equivalent ways of computing something (see
// kdkernels.h): per (kind, key), the first call runs each way once to warm it
// up (oneDNN JIT-compiles a kernel per shape, MKL sizes its buffers), then
// times both three times, interleaved, and keeps the faster (best of each)
// for the rest of the process, so every later call with that key computes the
// same bits. Recursive lock: timing the Gram matrix's one-GEMM way makes that
// GEMM choose its engine.
struct Choice {
  const TimedChoice* kind;
  bool first;
  double ms_first, ms_second;
};
std::recursive_mutex g_choice_mutex;
std::map<std::pair<std::string, ShapeKey>, Choice> g_choices;
constexpr size_t kMaxChoices = 4096;  // beyond this many keys: the second way, untimed

std::string gemm_key(const ShapeKey& k) {
  return std::to_string(k[0]) + "x" + std::to_string(k[1]) + "x" + std::to_string(k[2]) +
         (k[4] ? "" : " (b transposed)") + (k[5] ? " +c" : "") + " @" + std::to_string(k[6]) + "t";
}
// key: m, k, n, a contiguous, b row-major, accumulate, threads
const TimedChoice kGemmEngine{"gemm", "onednn", "aten", gemm_key};

std::string gram_key(const ShapeKey& k) {
  return "gram " + std::to_string(k[0]) + "x" + std::to_string(k[1]) + (k[2] == 8 ? " f64" : "") + " @" +
         std::to_string(k[3]) + "t";
}
// key: b, K, element size, threads
const TimedChoice kGramKernel{"gram", "triangle kernel", "one GEMM", gram_key};

}  // namespace

bool timed_choice(const TimedChoice& kind, const ShapeKey& key, const std::function<void()>& first,
                  const std::function<void()>& second) {
  std::lock_guard<std::recursive_mutex> lock(g_choice_mutex);
  const auto id = std::make_pair(std::string(kind.name), key);
  const auto it = g_choices.find(id);
  if (it != g_choices.end()) return it->second.first;
  if (g_choices.size() >= kMaxChoices) return false;
  first();
  second();
  double t1 = 1e300, t2 = 1e300;
  for (int round = 0; round < 3; ++round) {
    t1 = std::min(t1, best_ms(first, 1));
    t2 = std::min(t2, best_ms(second, 1));
  }
  const bool use_first = t1 <= t2;
  g_choices.emplace(id, Choice{&kind, use_first, t1, t2});
  return use_first;
}

namespace {

// oneDNN for this float32 call (else ATen).
const OneDnn* onednn_for(const Tensor& a, const Tensor& b, const Tensor* c) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || a.numel() == 0 || b.numel() == 0) {
    return nullptr;
  }
  const Engine& e = engine();
  if (!e.onednn || !at::globalContext().userEnabledMkldnn()) return nullptr;
  if (!e.per_shape) return &*e.onednn;
  const OneDnn& o = *e.onednn;
  const ShapeKey key = {a.size(0), a.size(1), b.size(1), a.is_contiguous() ? 1 : 0, b.stride(1) == 1 ? 1 : 0,
                        c != nullptr ? 1 : 0, at::get_num_threads()};
  const bool use = c == nullptr
                       ? timed_choice(kGemmEngine, key, [&] { onednn_mm(o, a, b); }, [&] { at::mm(a, b); })
                       : timed_choice(kGemmEngine, key, [&] { onednn_addmm(o, *c, a, b); },
                                      [&] { at::addmm(*c, a, b); });
  return use ? &o : nullptr;
}

}  // namespace

const char* gemm_engine() { return engine().name.c_str(); }

std::string gemm_engine_reason() {
  const Engine& e = engine();
  std::string out = e.why;
  std::lock_guard<std::recursive_mutex> lock(g_choice_mutex);
  const char* sep = ": ";
  for (const auto& [id, v] : g_choices) {
    out += sep + v.kind->describe(id.second) + " " + (v.first ? v.kind->first : v.kind->second) + " (" +
           std::to_string(v.ms_first) + " vs " + std::to_string(v.ms_second) + " ms)";
    sep = "; ";
  }
  return out;
}

Tensor gemm(const Tensor& a, const Tensor& b) {
  if (const OneDnn* o = onednn_for(a, b, nullptr)) return onednn_mm(*o, a, b);
  return at::mm(a, b).contiguous();
}

Tensor gemm_add(const Tensor& c, const Tensor& a, const Tensor& b) {
  if (const OneDnn* o = onednn_for(a, b, &c)) return onednn_addmm(*o, c, a, b);
  Tensor out = c;
  return out.addmm_(a, b);
}

Tensor gram_kernel(const Tensor& Q) {
  TORCH_CHECK(Q.dim() == 2 && (Q.scalar_type() == at::kFloat || Q.scalar_type() == at::kDouble),
              "kdkernels gram: Q must be a float32 or float64 [b, K] tensor");
  const Tensor q = unit_inner_stride(Q);
  Tensor A = at::empty({Q.size(0), Q.size(0)}, Q.options().memory_format(at::MemoryFormat::Contiguous));
  kernels().gram(kernel_dtype(Q.scalar_type()), q.const_data_ptr(), q.stride(0), Q.size(0), Q.size(1),
                 A.mutable_data_ptr());
  return A;
}

// Rows up to which the triangle kernel competes: its between-chunk buffer holds
// R*R vectors per block pair, about b^2 * 32 bytes (2 MiB at 256 rows).
constexpr int64_t kGramKernelMaxRows = 256;

Tensor gram(const Tensor& Q) {
  if (Q.size(0) > kGramKernelMaxRows) return gemm(Q, Q.t());
  const ShapeKey key = {Q.size(0), Q.size(1), static_cast<int64_t>(Q.element_size()), at::get_num_threads(), 0, 0, 0};
  const bool kernel = Q.numel() > 0 && timed_choice(kGramKernel, key, [&] { gram_kernel(Q); }, [&] { gemm(Q, Q.t()); });
  return kernel ? gram_kernel(Q) : gemm(Q, Q.t());
}

}  // namespace kdk
