// The GEMMs of the LSH and SP kernels.
//
// float32 products go through oneDNN (the copy built into libtorch_cpu, entry
// at::native::mkldnn_matmul) when the running torch exports it and the CPU
// passes oneDNN's fp32 check; everything else through ATen (at::mm / addmm).
// Why: on the AMD EPYC machine this project is measured on, ATen's float32 mm
// is MKL's AVX2 path (about 100 GFLOP/s per core, 40% of the AVX-512 FMA
// peak) while oneDNN's JIT kernels use AVX-512 (about 200-235 GFLOP/s per core
// at the LSH and SP shapes). Both are plain fp32 GEMMs with fp32 accumulation;
// oneDNN follows torch's float32 matmul precision setting as torch.mm does.
//
// The engine is chosen once per process (gemm_engine() says which):
// KDKERNELS_GEMM=aten forces ATen; torch.backends.mkldnn.enabled = False is
// honoured at each call.
#include "kdkernels.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace kdk {
namespace {

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha):
// result = beta * result + alpha * mat1 @ mat2. Not in torch's public headers,
// hence looked up by its mangled name in the already loaded libtorch_cpu.
using MkldnnMatmul = void (*)(const Tensor&, const Tensor&, const Tensor&, float, float);

MkldnnMatmul find_mkldnn_matmul() {
#if defined(__linux__)
  const char* forced = std::getenv("KDKERNELS_GEMM");
  if (forced != nullptr && std::strcmp(forced, "aten") == 0) return nullptr;
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  auto fn = reinterpret_cast<MkldnnMatmul>(dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  dlclose(lib);  // RTLD_NOLOAD took a reference to a library that stays loaded
  if (fn == nullptr) return nullptr;
  // oneDNN refuses float32 on CPUs without avx512bw/vl/dq (or avx_ne_convert):
  // one small product tells, and checks the result against ATen's.
  try {
    const Tensor a = at::arange(24, at::kFloat).view({4, 6}).div_(7);
    const Tensor b = at::arange(30, at::kFloat).view({6, 5}).sub_(11);
    Tensor out = at::empty({4, 5}, at::kFloat);
    fn(a, b, out, 0.0f, 1.0f);
    if (!at::allclose(out, at::mm(a, b), 1e-5, 1e-5)) return nullptr;
  } catch (const c10::Error&) {
    return nullptr;
  }
  return fn;
#else
  return nullptr;
#endif
}

MkldnnMatmul mkldnn_matmul_fn() {
  static const MkldnnMatmul fn = find_mkldnn_matmul();
  return fn;
}

bool use_onednn(const Tensor& a, const Tensor& b, const Tensor& out) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
         a.numel() > 0 && b.numel() > 0 && at::globalContext().userEnabledMkldnn() && mkldnn_matmul_fn() != nullptr;
}

}  // namespace

const char* gemm_engine() { return mkldnn_matmul_fn() != nullptr ? "onednn" : "aten"; }

void gemm_into(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (use_onednn(a, b, out)) {
    mkldnn_matmul_fn()(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    at::addmm_out(const_cast<Tensor&>(out), out, a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(out), a, b);
  }
}

Tensor gemm(const Tensor& a, const Tensor& b) {
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options().memory_format(at::MemoryFormat::Contiguous));
  gemm_into(out, a, b, false);
  return out;
}

}  // namespace kdk
