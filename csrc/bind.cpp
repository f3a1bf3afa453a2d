// The Python module pyengine._C. Loading it runs the static TORCH_LIBRARY registrations of every
// op, which then live under torch.ops.pyengine; the module itself exports only the run-time
// settings of the CPU kernels (csrc/cpu/settings.h), which pyengine.backends wraps.
// Kept free of <torch/extension.h> so it compiles in seconds.
#include <Python.h>

#include "cpu/gemm.h"
#include "cpu/settings.h"

namespace {

using pyengine::cpu::Isa;
using pyengine::cpu::LstmPath;

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(pyengine::cpu::isa_name(pyengine::cpu::active_isa()));
}

PyObject* best_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(pyengine::cpu::isa_name(pyengine::cpu::best_isa()));
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  Isa isa;
  if (!pyengine::cpu::parse_isa(name, &isa)) {
    PyErr_Format(PyExc_ValueError,
                 "cpu capability must be 'default', 'avx2' or 'avx512', got '%s'", name);
    return nullptr;
  }
  if (isa > pyengine::cpu::best_isa()) {
    PyErr_Format(PyExc_ValueError, "this CPU does not support the %s kernels (best: %s)", name,
                 pyengine::cpu::isa_name(pyengine::cpu::best_isa()));
    return nullptr;
  }
  pyengine::cpu::set_isa(isa);
  Py_RETURN_NONE;
}

PyObject* lstm_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(pyengine::cpu::lstm_path_name(pyengine::cpu::lstm_path()));
}

PyObject* set_lstm_path(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  LstmPath path;
  if (!pyengine::cpu::parse_lstm_path(name, &path)) {
    PyErr_Format(PyExc_ValueError, "lstm path must be 'auto', 'fused' or 'gemm', got '%s'", name);
    return nullptr;
  }
  pyengine::cpu::set_lstm_path(path);
  Py_RETURN_NONE;
}

PyObject* recent_blocks(PyObject*, PyObject*) {
  return PyBool_FromLong(pyengine::cpu::recent_blocks());
}

PyObject* set_recent_blocks(PyObject*, PyObject* arg) {
  const int enabled = PyObject_IsTrue(arg);
  if (enabled < 0) return nullptr;
  pyengine::cpu::set_recent_blocks(enabled != 0);
  Py_RETURN_NONE;
}

PyObject* gemm_library(PyObject*, PyObject*) {
  return PyUnicode_FromString(pyengine::cpu::gemm_library_name(pyengine::cpu::gemm_library()));
}

PyObject* set_gemm_library(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  pyengine::cpu::GemmLibrary library;
  if (!pyengine::cpu::parse_gemm_library(name, &library)) {
    PyErr_Format(PyExc_ValueError, "gemm must be 'auto', 'aten' or 'onednn', got '%s'", name);
    return nullptr;
  }
  pyengine::cpu::set_gemm_library(library);
  Py_RETURN_NONE;
}

PyObject* gemm_runs_on(PyObject*, PyObject*) {
  const bool onednn =
      pyengine::cpu::gemm_uses_onednn() && pyengine::cpu::onednn_gemm_available();
  return PyUnicode_FromString(onednn ? "onednn" : "aten");
}

PyObject* onednn_gemm_available(PyObject*, PyObject*) {
  return PyBool_FromLong(pyengine::cpu::onednn_gemm_available());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The instruction set of the CPU kernels."},
    {"best_cpu_capability", best_cpu_capability, METH_NOARGS,
     "The best instruction set this CPU runs."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Use the kernels of another set."},
    {"lstm_path", lstm_path, METH_NOARGS, "The float LSTM's recurrence path."},
    {"set_lstm_path", set_lstm_path, METH_O, "Force the LSTM path: auto, fused or gemm."},
    {"recent_blocks", recent_blocks, METH_NOARGS, "Whether the recent-blocks allocator is on."},
    {"set_recent_blocks", set_recent_blocks, METH_O, "Switch the recent-blocks allocator."},
    {"gemm_library", gemm_library, METH_NOARGS, "The GEMM library setting."},
    {"set_gemm_library", set_gemm_library, METH_O, "Set the GEMM library: auto, aten or onednn."},
    {"gemm_runs_on", gemm_runs_on, METH_NOARGS, "The library the float GEMMs run on now."},
    {"onednn_gemm_available", onednn_gemm_available, METH_NOARGS,
     "Whether oneDNN float32 GEMMs work with this torch."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef pyengine_module = {PyModuleDef_HEAD_INIT, "_C",
                               "pyengine native ops (registered under torch.ops.pyengine)", -1,
                               methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyengine_module); }
