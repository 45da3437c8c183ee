// The Python extension module `gradience_kernels._C`. It carries no Python functions: importing
// it runs the static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations of every op in this
// library, which must happen before any torch.library call from Python (fake kernels).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gradience_kernels ops", -1,
                                   nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
