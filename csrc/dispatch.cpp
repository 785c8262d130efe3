// The kernel table in use: installed once from the kernel module that
// kdkernels/_cpu.py imported for torch's CPU capability (csrc/kernels.h).
#include <c10/util/Exception.h>

#include <atomic>

#include "kdkernels.h"

namespace kdk {
namespace {
std::atomic<const KernelTable*> g_table{nullptr};
}  // namespace

void install_kernels(const KernelTable* table) {
  TORCH_CHECK(table != nullptr, "kdkernels: no kernel table");
  g_table.store(table, std::memory_order_release);
}

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  TORCH_CHECK(t != nullptr, "kdkernels: no CPU kernel module installed (import kdkernels._cpu, which picks one)");
  return *t;
}

Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "kdkernels: unsupported dtype ", t, " (float32, float64, float16 or bfloat16)");
}

}  // namespace kdk
