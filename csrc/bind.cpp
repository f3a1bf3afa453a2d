// The Python module pyengine._C. It exports nothing itself: loading it runs the static
// TORCH_LIBRARY registrations of every op, which then live under torch.ops.pyengine.
// Kept free of <torch/extension.h> so it compiles in seconds.
#include <Python.h>

static struct PyModuleDef pyengine_module = {
    PyModuleDef_HEAD_INIT, "_C", "pyengine native ops (registered under torch.ops.pyengine)", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyengine_module); }
