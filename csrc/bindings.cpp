// Python bindings of kdkernels._C: one entry per backend-protocol function
// (see kdkernels/_ops.py for the contract each one follows).
#include <torch/extension.h>

#include "kdkernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels fused CPU kernels";
  // The kernels' results carry no autograd history whatever the caller's grad
  // mode (kdkernels/_ops.py attaches the backward itself).
  using NoGrad = py::call_guard<at::NoGradGuard>;
  m.def("ofd_forward", &kdk::ofd_forward, NoGrad(), "OFD: loss sum and scaled gradients in one pass");
  m.def("ofd_none", &kdk::ofd_none, NoGrad(), "OFD: elementwise loss (reduction='none')");
  m.def("ofd_backward", &kdk::ofd_backward, NoGrad(), "OFD: gradients for an elementwise upstream gradient");
  m.def("nd_forward", &kdk::nd_forward, NoGrad(), "ND: per-row loss and row-weighted gradients");
  m.def("lsh_forward", &kdk::lsh_forward, NoGrad(), "LSH: per-row loss and row-weighted gradients");
  m.def("gemm_engine", &kdk::gemm_engine, "The engine of the LSH and SP float32 GEMMs: 'per-shape' (the faster per call shape), or 'onednn' / 'aten'");
  m.def("gemm_engine_reason", &kdk::gemm_engine_reason, "Why that engine (forced, or each call shape's choice and times so far)");
  m.def("_install_kernels", [](const py::object& table) {
    TORCH_CHECK(PyCapsule_IsValid(table.ptr(), kdk::kKernelTableName), "kdkernels: not a kernel table capsule");
    kdk::install_kernels(static_cast<const kdk::KernelTable*>(PyCapsule_GetPointer(table.ptr(), kdk::kKernelTableName)));
  }, "Use the loops of a kernel module (kdkernels._kernels_<isa>.table); kdkernels/_cpu.py calls it");
  m.def("kernel_capability", [] { return std::string(kdk::kernels().capability); },
        "The ISA level of the installed kernel module: 'DEFAULT', 'AVX2' or 'AVX512'");
  m.def("gemm", &kdk::gemm, "a @ b through the kernels' GEMM engine (the benchmark's same-engine floor)");
  m.def("gram", &kdk::gram, "Q @ Q^T as SP computes it (per shape the faster of the triangle kernel and one GEMM)");
  m.def("_gram_kernel", &kdk::gram_kernel, "Q @ Q^T by the installed kernel module's triangle kernel alone (tests)");
  m.def("attach_scaled_grads", &kdk::attach_scaled_grads,
        "Give a reduced loss a backward that scales the gradients its forward computed (kdkernels/_ops.py, run)");
  m.def("empty_output_cache", &kdk::empty_output_cache, "Frees the idle blocks of the big-output cache");
  m.def("output_cache_idle_bytes", &kdk::output_cache_idle_bytes, "Bytes of idle blocks the big-output cache holds");
  m.def("output_cache_limit", &kdk::output_cache_limit, "Most idle bytes the big-output cache keeps");
  m.def("set_output_cache_limit", &kdk::set_output_cache_limit, "Sets that limit (0: off); idle blocks beyond it are freed");
  m.def("sp_forward", &kdk::sp_forward, NoGrad(), "SP: per-row loss and row-weighted gradients of one layer pair");
}
