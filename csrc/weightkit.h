// The C ABI of weightkit's compiled kernels: every function the Python package calls. csrc/bind.cpp binds them into
// the pybind11 module weightkit._C, deriving each Python signature from the declaration here (a change here either
// compiles into the matching binding or fails to compile); bump WK_ABI_VERSION on any change.
//
// Why a plain C ABI and not torch's C++ API: nothing built from csrc/ links libtorch, so one build loads under every
// torch release that weightkit supports. A C++ extension linked against libtorch only loads under the exact torch it
// was compiled with (its symbols are mangled C++ names of that release). The price is that the kernels see raw
// pointers: outputs are allocated by torch in Python, and the parts that were ATen calls (BLAS matmuls, sorts, dtype
// conversions, zero fills) are done by torch in Python around the kernel calls (weightkit/backends/cpu, .../cuda).
//
// Argument checks live once, in Python: each op's `check` (weightkit/ops/*.py, messages naming the argument) and the
// backends' host code (contiguity, output allocation). What every CUDA entry point shares (device guard, dtype
// dispatch, launch status) is csrc/cuda/common.cuh, the CPU dtype dispatch is csrc/cpu/dtypes.h.
//
// Conventions (the Python caller guarantees them; the kernels do not re-check):
// * tensors are contiguous, on the right device, of the dtype in the argument's name or given by a dtype code;
// * sizes are element counts (int64_t), `threads` is torch.get_num_threads() (CPU kernels: how many threads the
//   parallel loops may use; results never depend on it);
// * CPU functions return WK_OK, WK_BAD_DTYPE for a dtype code they do not handle, WK_NO_MEMORY when their
//   scratch buffer cannot be allocated, or (the dictionary bitmask kernels) WK_BAD_CODES for malformed codes;
// * CUDA functions take the device index and the cudaStream_t of torch's current stream on that device and return
//   a cudaError_t (0 = success) after the launches (asynchronous errors surface at the next synchronization).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
#define WK_API extern "C" __attribute__((visibility("default")))
#else
#define WK_API __attribute__((visibility("default")))
#endif

#define WK_ABI_VERSION 9

enum wk_dtype { WK_F32 = 0, WK_F16 = 1, WK_BF16 = 2, WK_U8 = 3, WK_I16 = 4, WK_I32 = 5, WK_I64 = 6 };
enum wk_status { WK_OK = 0, WK_BAD_DTYPE = 1, WK_NO_MEMORY = 2, WK_BAD_CODES = 3 };

// ---- CPU kernels (csrc/cpu/*.cpp, compiled into weightkit._C) ------------------------------------------------------------
WK_API int wk_cpu_abi_version(void);

// INT8 stochastic rounding (spec: weightkit/ops/int8.py). x: n values of dtype x_dtype (f32/f16/bf16).
WK_API int wk_cpu_stochastic_round_int8(const void* x, int x_dtype, const float* scale, int8_t* out, int64_t n,
                                        int64_t group_size, uint64_t seed, uint64_t offset, int threads);
// Fused Q-GaLore write-back on `groups` groups of group_size values, in place on q and scale. found_inf: null, or
// one float; where it is nonzero nothing is written (the optimizers' device-side skip; read by the kernel).
WK_API int wk_cpu_int8_sr_update(int8_t* q, float* scale, const void* delta, int delta_dtype, int64_t groups,
                                 int64_t group_size, float decay, uint64_t seed, uint64_t offset,
                                 const float* found_inf, int threads);
// Few-token int8 matmul, fp32: y (tokens x out_f) = x W^T, or with transpose y (tokens x in_f) = x W.
WK_API int wk_cpu_int8_matvec(const float* x, const int8_t* q, const float* scale, float* y, int64_t tokens,
                              int64_t out_f, int64_t in_f, int64_t group_size, int transpose, int threads);
// Rows [r0, r1) of the dequantized int8 matrix (out_f x in_f) into buf ((r1 - r0) x in_f, fp32).
WK_API int wk_cpu_int8_dequantize_rows(const int8_t* q, const float* scale, float* buf, int64_t r0, int64_t r1,
                                       int64_t in_f, int64_t group_size, int threads);

// INT4 (spec: weightkit/ops/int4.py): quantize `groups` groups of group_size fp32 values; dequantize the flat
// elements [e0, e1) into out[0 .. e1 - e0).
WK_API int wk_cpu_quantize_int4(const float* x, uint8_t* packed, float* scale, uint8_t* zero, int64_t groups,
                                int64_t group_size, int threads);
WK_API int wk_cpu_dequantize_int4(const uint8_t* packed, const float* scale, const uint8_t* zero, float* out,
                                  int64_t group_size, int64_t e0, int64_t e1, int threads);

// GaLore (spec: weightkit/ops/galore.py): M, V updated in place and U = M / (sqrt(V) + eps), n values.
WK_API int wk_cpu_low_rank_adam(const float* r, float* m, float* v, float* u, int64_t n, float beta1, float beta2,
                                float eps, int threads);
// 8-bit blockwise Adam moments in one pass (spec: weightkit/ops/moments8bit.py): n values in blocks of 256, codes
// uint8 and one float absmax per block for each moment, 256-entry code tables, the direction (n floats) written;
// one_minus_beta*: (1 - beta) rounded from double, as the reference's scalars. found_inf as wk_cpu_int8_sr_update's
// (set: nothing written but a zero direction).
WK_API int wk_cpu_blockwise8bit_adam(const float* low, uint8_t* exp_avg_q, float* exp_avg_absmax,
                                     uint8_t* exp_avg_sq_q, float* exp_avg_sq_absmax, const float* code_signed,
                                     const float* code_unsigned, float* direction, int64_t n, float beta1,
                                     float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                                     const float* found_inf, int threads);

// MemoryFormer (spec: weightkit/ops/memoryformer.py). x: n x (K tau) of x_dtype, tables: K x buckets x d_out of
// tables_dtype, y: n x d_out of x_dtype. Backward: all fp32, gt zero-filled by the caller.
WK_API int wk_cpu_memory_lookup_forward(const void* x, int x_dtype, const void* tables, int tables_dtype, void* y,
                                        int64_t n, int64_t tables_k, int64_t buckets, int64_t d_out, int tau, double t,
                                        int threads);
WK_API int wk_cpu_memory_lookup_backward(const float* grad, const float* x, const float* tables, float* gx, float* gt,
                                         int64_t n, int64_t tables_k, int64_t buckets, int64_t d_out, int tau,
                                         double t, int threads);

// Dictionary matmul with S (k x d_out, s nonzeros per column) in the bitmask format (spec: weightkit/ops/dictionary.py,
// dict_bitmask_matmul): bitmask int32 (ceil(k/32) x d_out), values (s x d_out) of value_dtype, word_offsets
// (ceil(k/32) x d_out) of offset_dtype (u8/i16/i32). z, grad, y and grad_z have z_dtype; grad_values value_dtype.
// forward: y (n x d_out) = z (n x k) S; backward: grad_z = grad S^T and grad_values (both written whole;
// deterministic, fp32 partials over fixed column blocks). All four return WK_BAD_CODES on a malformed bitmask /
// word_offsets pair (their reads and writes stay in bounds: the codes are checked as they are decoded). to_dense_t: dense_t ((c1 - c0) x k, fp32) = columns
// [c0, c1) of S as rows (S^T's rows c0..c1-1); gather_dense_t: out[r, j] (s x d_out, out_dtype; columns [c0, c1)) =
// dense_t[j - c0, the atom of the r-th nonzero of column j].
WK_API int wk_cpu_dict_bitmask_forward(const void* z, int z_dtype, const void* values, int value_dtype,
                                       const int32_t* bitmask, const void* word_offsets, int offset_dtype, void* y,
                                       int64_t n, int64_t k, int64_t s, int64_t d_out, int threads);
WK_API int wk_cpu_dict_bitmask_backward(const void* grad, const void* z, int z_dtype, const void* values,
                                        int value_dtype, const int32_t* bitmask, const void* word_offsets,
                                        int offset_dtype, void* grad_z, void* grad_values, int64_t n, int64_t k,
                                        int64_t s, int64_t d_out, int threads);
WK_API int wk_cpu_dict_bitmask_to_dense_t(const void* values, int value_dtype, const int32_t* bitmask,
                                          const void* word_offsets, int offset_dtype, float* dense_t, int64_t k,
                                          int64_t s, int64_t d_out, int64_t c0, int64_t c1, int threads);
WK_API int wk_cpu_dict_bitmask_gather_dense_t(const float* dense_t, const int32_t* bitmask, const void* word_offsets,
                                              int offset_dtype, void* out, int out_dtype, int64_t k, int64_t s,
                                              int64_t d_out, int64_t c0, int64_t c1, int threads);

// ---- CUDA library (libweightkit_cuda.so, csrc/cuda/*.cu) ----------------------------------------------------------
WK_API int wk_cuda_abi_version(void);
// "80;90;100": the SASS architectures built in (plus PTX of the last one).
WK_API const char* wk_cuda_archs(void);
// cudaSuccess when a kernel of this library can run on `device`; else why not (driver too old, no kernel image, ...).
WK_API int wk_cuda_probe(int device);
WK_API const char* wk_cuda_error_string(int error);

WK_API int wk_cuda_stochastic_round_int8(const void* x, int x_dtype, const float* scale, int8_t* out, int64_t n,
                                         int64_t group_size, uint64_t seed, uint64_t offset, int device, void* stream);
WK_API int wk_cuda_int8_sr_update(int8_t* q, float* scale, const void* delta, int delta_dtype, int64_t groups,
                                  int64_t group_size, float decay, uint64_t seed, uint64_t offset,
                                  const float* found_inf, int device, void* stream);
// The block W[r0 : r0 + rows, c0 : c0 + cols] of the dequantized int8 matrix (rows of in_f values, groups of
// group_size along a row) into out (rows x cols, row-major, dtype out_dtype: f32/f16/bf16; q * scale in fp32, rounded
// once to out_dtype).
WK_API int wk_cuda_dequantize_int8(const int8_t* q, const float* scale, void* out, int out_dtype, int64_t in_f,
                                   int64_t group_size, int64_t r0, int64_t rows, int64_t c0, int64_t cols, int device,
                                   void* stream);
// Few-token int8 matmul y (tokens x out_f, x_dtype) = x (tokens x in_f, x_dtype) W^T, W read once (a GEMV per
// token block): 1 <= tokens <= 8, in_f and group_size multiples of 16, q 16-byte aligned, rows_per_warp 1, 2 or 4
// (cudaErrorInvalidValue otherwise). Products and sums in fp32, each weight q * scale in fp32, y rounded once.
WK_API int wk_cuda_int8_gemv(const void* x, int x_dtype, const int8_t* q, const float* scale, void* y, int64_t tokens,
                             int64_t out_f, int64_t in_f, int64_t group_size, int64_t rows_per_warp, int device,
                             void* stream);
WK_API int wk_cuda_quantize_int4(const float* x, uint8_t* packed, float* scale, uint8_t* zero, int64_t groups,
                                 int64_t group_size, int device, void* stream);
// The block W[r0 : r0 + rows, c0 : c0 + cols] of the dequantized INT4 matrix (rows of n_cols values, groups over the
// flat index) into out (rows x cols, row-major, dtype out_dtype: f32/f16/bf16; (q - z) * s in fp32, rounded once).
WK_API int wk_cuda_dequantize_int4(const uint8_t* packed, const float* scale, const uint8_t* zero, void* out,
                                   int out_dtype, int64_t n_cols, int64_t group_size, int64_t r0, int64_t rows,
                                   int64_t c0, int64_t cols, int device, void* stream);
// Few-token INT4 matmul y (tokens x out_f) = x (tokens x in_f) W^T, W (out_f x in_f) as dequantize_int4 reads it, read
// once: 1 <= tokens <= 8, in_f and group_size multiples of 32, packed 16-byte aligned, rows_per_warp 1, 2 or 4.
WK_API int wk_cuda_int4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* scale,
                             const uint8_t* zero, void* y, int64_t tokens, int64_t out_f, int64_t in_f,
                             int64_t group_size, int64_t rows_per_warp, int device, void* stream);
WK_API int wk_cuda_low_rank_adam(const float* r, float* m, float* v, float* u, int64_t n, float beta1, float beta2,
                                 float eps, int device, void* stream);
// The exact bf16 parts of x (rows x cols of dtype x_dtype, f32: three parts, f16: two; element (r, c) at
// r * stride_xr + c * stride_xc: any strides), part i of (r, c) at out + i * part_step + r * stride_or + c
// (spec: weightkit/ops/galore.py, bf16_parts).
WK_API int wk_cuda_bf16_parts(const void* x, int x_dtype, void* out, int64_t rows, int64_t cols, int64_t stride_xr,
                              int64_t stride_xc, int64_t stride_or, int64_t part_step, int device, void* stream);
// MemoryFormer. Forward: token_block (1, 2 or 4) tokens per block, the tables split in `splits` runs; with splits > 1,
// partials (splits x n x d_out fp32) and counters (ceil(n / token_block) x ceil(d_out / tile) zeros, left zero) are
// scratch (tile: 128 columns of fp32 tables, 256 of bf16/fp16). grad, x and gx share x_dtype.
WK_API int wk_cuda_memory_lookup_forward(const void* x, int x_dtype, const void* tables, int tables_dtype, void* y,
                                         float* partials, unsigned* counters, int64_t n, int64_t tables_k,
                                         int64_t buckets, int64_t d_out, int tau, double t, int64_t token_block,
                                         int64_t splits, int device, void* stream);
// Writes gx; adds p g to gt_atomic (fp32, zero-filled) unless null; writes keys (n x K: k * buckets + bucket) and
// ps (n x K) unless null.
WK_API int wk_cuda_memory_lookup_backward(const void* grad, const void* x, int x_dtype, const void* tables,
                                          int tables_dtype, void* gx, float* gt_atomic, int64_t* keys, float* ps,
                                          int64_t n, int64_t tables_k, int64_t buckets, int64_t d_out, int tau,
                                          double t, int device, void* stream);
// The stable sort of the segment pass by counting, per table (buckets <= 1024): order (n K) lists the flat pair
// indices t K + k by key k * buckets + bucket (keys: n x K), starts (K buckets + 1) each key's first entry, the last
// n K: the same as a stable sort and a search of every key's first entry.
WK_API int wk_cuda_memory_rank_keys(const int64_t* keys, int64_t* order, int64_t* starts, int64_t n, int64_t tables_k,
                                    int64_t buckets, int device, void* stream);
// Table gradient gt (rows x d_out, gt_dtype), every row written: row r sums ps[order[e]] grad[order[e] / K] over its
// run e in [starts[r], starts[r + 1]) of the stably sorted keys (order: the sort's permutation of 0 .. n K - 1).
WK_API int wk_cuda_memory_segment_sum(const int64_t* order, const int64_t* starts, const float* ps, const void* grad,
                                      int grad_dtype, void* gt, int gt_dtype, int64_t rows, int64_t tables_k,
                                      int64_t d_out, int device, void* stream);
// Dictionary matmul, S in the bitmask format (as the CPU functions above; spec: weightkit/ops/dictionary.py): the
// "decode S + cuBLAS" path. to_dense_t: dense_t (d_out x k, dense_dtype) = S^T. gather_dense_t: out (s x d_out,
// out_dtype, values' order) = dense_t (d_out x k, dense_dtype) at S's nonzeros, each entry written once. Ranks that a
// malformed bitmask / word_offsets pair puts outside [0, s) are skipped (no access out of bounds).
WK_API int wk_cuda_dict_bitmask_to_dense_t(const void* values, int value_dtype, const int32_t* bitmask,
                                           const void* word_offsets, int offset_dtype, void* dense_t, int dense_dtype,
                                           int64_t k, int64_t s, int64_t d_out, int device, void* stream);
WK_API int wk_cuda_dict_bitmask_gather_dense_t(const void* dense_t, int dense_dtype, const int32_t* bitmask,
                                               const void* word_offsets, int offset_dtype, void* out, int out_dtype,
                                               int64_t k, int64_t s, int64_t d_out, int device, void* stream);
