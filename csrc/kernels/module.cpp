// The Python module kdkernels._kernels_<isa>: one KernelTable of this build's
// ISA level, as a capsule for kdkernels._C (see csrc/kernels.h).
#include <Python.h>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
#define KDK_STR2(x) #x
#define KDK_STR(x) KDK_STR2(x)
const KernelTable kTable = {KDK_STR(CPU_CAPABILITY), &ofd, &nd, &lsh_chunk, &lsh_rows, &sp_rows, &gram};
}  // namespace CPU_CAPABILITY
}  // namespace kdk

#define KDK_CONCAT2(a, b) a##b
#define KDK_CONCAT(a, b) KDK_CONCAT2(a, b)

static PyModuleDef kdk_module = {PyModuleDef_HEAD_INIT, KDK_STR(TORCH_EXTENSION_NAME),
                                 "kdkernels CPU kernels compiled for one ISA level", -1, nullptr};

PyMODINIT_FUNC KDK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&kdk_module);
  if (m == nullptr) return nullptr;
  PyObject* cap = PyCapsule_New(const_cast<kdk::KernelTable*>(&kdk::kTable), kdk::kKernelTableName, nullptr);
  if (cap == nullptr || PyModule_AddObject(m, "table", cap) < 0 ||
      PyModule_AddStringConstant(m, "capability", kdk::kTable.capability) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
