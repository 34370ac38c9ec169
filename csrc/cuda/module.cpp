// An importable (empty) Python module for the CUDA kernels; `import torch_dpfast._C_cuda`
// registers them on the CUDA key of the dpfast_C ops (whose schemas _C defines).
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
