// The schemas of weightkit's compiled kernels, one per op, and the Python module entry point of weightkit._C.
//
// Each public op (weightkit::<name>, defined in weightkit/ops/*.py with torch.library.custom_op) picks a
// backend at run time; its `cpu` and `cuda` backends call the kernel op weightkit::<name>_kernel declared
// here, whose CPU implementation lives in csrc/cpu/ and CUDA implementation in csrc/cuda/. Kernel ops expect
// contiguous, already validated inputs: argument checking lives in the Python op.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(weightkit, m) {
  // hot path 1: INT8 stochastic rounding / INT4 projection (csrc/*/int8.*)
  m.def("stochastic_round_int8_kernel(Tensor x, Tensor scale, int group_size, int seed, int offset) -> Tensor");
  m.def("int8_matmul_kernel(Tensor x, Tensor w_q, Tensor scale, int group_size, bool transpose) -> Tensor");
  m.def(
      "int8_sr_update_kernel(Tensor(a!) w_q, Tensor(b!) scale, Tensor delta, int group_size, float decay, int seed, "
      "int offset) -> ()");
  m.def("quantize_int4_kernel(Tensor x, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize_int4_kernel(Tensor packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def(
      "int4_matmul_kernel(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size, int rows, int cols, "
      "bool transpose) -> Tensor");
  // hot path 2: fused GaLore Adam step (csrc/*/galore.*)
  m.def(
      "galore_adam_update_kernel(Tensor(a!) weight, Tensor low_grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor ortho, bool left, float beta1, float beta2, float eps, float step_size, float scale, float decay) -> ()");
  // hot path 3: MemoryFormer hashed lookup tables (csrc/*/memoryformer.*)
  m.def("memory_lookup_forward_kernel(Tensor x, Tensor tables, float t) -> Tensor");
  m.def(
      "memory_lookup_backward_kernel(Tensor grad, Tensor x, Tensor tables, float t, bool deterministic) "
      "-> (Tensor, Tensor)");
  // hot path 4: sparse-dense dictionary matmul (csrc/*/dictionary.*)
  m.def("dict_sparse_gather_kernel(Tensor z, Tensor values, Tensor indices) -> Tensor");
  m.def("dict_sparse_gather_backward_kernel(Tensor grad, Tensor z, Tensor values, Tensor indices) -> (Tensor, Tensor)");
}

static struct PyModuleDef weightkit_C_module = {PyModuleDef_HEAD_INIT, "_C", "weightkit compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&weightkit_C_module);
  if (module == nullptr) return nullptr;
#ifdef WEIGHTKIT_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
