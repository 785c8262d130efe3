// Python bindings of kdkernels._C: one entry per backend-protocol function
// (see kdkernels/_ops.py for the contract each one follows).
// torch 2.13's headers use C++20 bit-field initialisers; under -std=c++17 gcc
// warns inside them. setup.py should build with -std=c++20 (as torch itself is
// built); until then keep our build output warning-free.
#if __cplusplus < 202002L && defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wc++20-extensions"
#endif
#include <torch/extension.h>

#include "kdkernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels fused CPU kernels";
  m.def("ofd_forward", &kdk::ofd_forward, "OFD: loss sum and scaled gradients in one pass");
  m.def("ofd_none", &kdk::ofd_none, "OFD: elementwise loss (reduction='none')");
  m.def("ofd_backward", &kdk::ofd_backward, "OFD: gradients for an elementwise upstream gradient");
  m.def("nd_forward", &kdk::nd_forward, "ND: per-row loss and row-weighted gradients");
  m.def("lsh_forward", &kdk::lsh_forward, "LSH: per-row loss and row-weighted gradients");
  m.def("sp_forward", &kdk::sp_forward, "SP: per-row loss and row-weighted gradients of one layer pair");
}
