// CUDA kernels for INT8 stochastic rounding and the int8 matmul (spec: weightkit/ops/int8.py): up to 8 tokens of
// y = x W^T a GEMV reading the weight once (gemv.cuh); otherwise the products are cuBLAS calls made by torch in
// weightkit/backends/cuda on the same stream, on the weight dequantized to the activation dtype by the kernels here
// (weightkit/backends/_blocked.py, dequant_matmul).
#include <cfloat>

#include "../philox.h"
#include "common.cuh"
#include "gemv.cuh"

namespace weightkit {
namespace {

// One thread per Philox block of four consecutive stream positions. The group index is divided once per thread
// and stepped for the following lanes (a 64-bit division costs tens of instructions), and 1/scale is recomputed
// only when the group changes.
template <typename scalar_t>
__global__ void stochastic_round_int8_cuda_kernel(const scalar_t* __restrict__ x, const float* __restrict__ scale,
                                                  int8_t* __restrict__ q, uint64_t first, uint64_t last,
                                                  int64_t group_size, uint64_t seed, int64_t blocks) {
  const int64_t block0 = static_cast<int64_t>(first >> 2);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t b = static_cast<uint64_t>(block0 + t);
    const Philox4 r = philox4x32_10(b, seed);
    const uint64_t g0 = b * 4 < first ? first : b * 4;  // the first valid position of this block
    const int64_t i0 = static_cast<int64_t>(g0 - first);
    int64_t gi = i0 / group_size;
    int64_t rem = i0 - gi * group_size;
    float inv = __fdiv_rn(1.0f, scale[gi]);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t g = b * 4 + lane;
      if (g < first || g >= last) continue;
      if (rem == group_size) {  // valid lanes are consecutive elements: step to the next group
        ++gi;
        rem = 0;
        inv = __fdiv_rn(1.0f, scale[gi]);
      }
      const int64_t i = static_cast<int64_t>(g - first);
      float v = floorf(__fadd_rn(__fmul_rn(to_float(x[i]), inv), bits_to_uniform(r.v[lane])));
      v = fminf(fmaxf(v, -128.f), 127.f);
      q[i] = static_cast<int8_t>(v);
      ++rem;
    }
  }
}

// Fused Q-GaLore weight update (spec: int8_sr_update_ in weightkit/ops/int8.py): one warp per group; lanes
// reduce max|w|, then each lane rounds its elements with the Philox value of its stream position.
template <typename scalar_t>
__global__ void int8_sr_update_cuda_kernel(int8_t* __restrict__ q, float* __restrict__ scale,
                                           const scalar_t* __restrict__ delta, int64_t groups, int64_t gs,
                                           float decay, uint64_t seed, uint64_t offset,
                                           const float* __restrict__ found_inf) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (g >= groups) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // a skipped step (whole warps leave: no collective ran)
  int8_t* qg = q + g * gs;
  const scalar_t* dg = delta + g * gs;
  const float s = scale[g];
  float amax = 0.0f;
  for (int64_t i = lane; i < gs; i += 32) {
    const float w = __fmul_rn(__fadd_rn(__fmul_rn(static_cast<float>(qg[i]), s), to_float(dg[i])), decay);
    amax = fmaxf(amax, fabsf(w));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float ns = fmaxf(__fdiv_rn(amax, 127.0f), FLT_MIN);
  const float inv = __fdiv_rn(1.0f, ns);
  __syncwarp();
  const uint64_t base = offset + static_cast<uint64_t>(g * gs);
  if ((base & 3) == 0 && (gs & 3) == 0) {
    // aligned: each lane rounds 4 consecutive elements with the 4 lanes of one Philox block
    for (int64_t i = 4 * lane; i < gs; i += 128) {
      const Philox4 r = philox4x32_10((base + static_cast<uint64_t>(i)) >> 2, seed);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float w = __fmul_rn(__fadd_rn(__fmul_rn(static_cast<float>(qg[i + j]), s),
                                            to_float(dg[i + j])), decay);
        float v = floorf(__fadd_rn(__fmul_rn(w, inv), bits_to_uniform(r.v[j])));
        qg[i + j] = static_cast<int8_t>(fminf(fmaxf(v, -128.f), 127.f));
      }
    }
  } else {
    for (int64_t i = lane; i < gs; i += 32) {
      const float w = __fmul_rn(__fadd_rn(__fmul_rn(static_cast<float>(qg[i]), s), to_float(dg[i])), decay);
      const uint64_t pos = base + static_cast<uint64_t>(i);
      const Philox4 r = philox4x32_10(pos >> 2, seed);
      float v = floorf(__fadd_rn(__fmul_rn(w, inv), bits_to_uniform(r.v[pos & 3])));
      v = fminf(fmaxf(v, -128.f), 127.f);
      qg[i] = static_cast<int8_t>(v);
    }
  }
  if (lane == 0) scale[g] = ns;
}

// The dequantization of int8_matmul's "dequantize to the activation dtype + cuBLAS" path: the block
// W[r0 : r0 + rows, c0 : c0 + cols] of W = q * scale (row length in_f, groups of `group` along a row) into out (rows x
// cols, row-major), each value q * s computed in fp32 (as the reference does) and rounded once to out_t.
//
// Bandwidth-bound (1 byte read, 2 or 4 written per value). The vector kernel gives each thread 16 consecutive values
// of a row: one 16-byte load of the weight (streamed: __ldcs, evict-first, it is read once) and 16-byte stores (2 for
// bf16/fp16, 4 for fp32); one scale per vector when 16 divides the group. The host takes it when every vector is
// 16-byte aligned, else the scalar kernel (one value per thread).
template <typename out_t, bool kOneScale>
__global__ void dequantize_int8_vec_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale,
                                           out_t* __restrict__ out, int64_t in_f, int64_t group, int64_t r0,
                                           int64_t c0, int64_t cols, int64_t vectors) {
  const int64_t per_row = cols / 16;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v / per_row, j = (v - i * per_row) * 16;
    const int64_t e = (r0 + i) * in_f + c0 + j;  // flat index of the vector's first value in W
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(q + e));
    const int8_t* b = reinterpret_cast<const int8_t*>(&raw);
    float w[16];
    if (kOneScale) {
      const float s = scale[e / group];
#pragma unroll
      for (int k = 0; k < 16; ++k) w[k] = __fmul_rn(static_cast<float>(b[k]), s);
    } else {
#pragma unroll
      for (int k = 0; k < 16; ++k) w[k] = __fmul_rn(static_cast<float>(b[k]), scale[(e + k) / group]);
    }
    store16(out + i * cols + j, w);
  }
}

template <typename out_t>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale,
                                       out_t* __restrict__ out, int64_t in_f, int64_t group, int64_t r0, int64_t c0,
                                       int64_t cols, int64_t n) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / cols;
    const int64_t e = (r0 + i) * in_f + c0 + (t - i * cols);
    out[t] = from_float<out_t>(__fmul_rn(static_cast<float>(q[e]), scale[e / group]));
  }
}

// int8_matmul's few-token GEMV (gemv.cuh) over int8 rows: 16 weights a 16-byte load, one scale each (16 divides
// the group).
struct Int8Rows {
  static constexpr int kVals = 16;
  struct Vector {
    uint4 raw;
    float s;
  };
  const int8_t* q;
  const float* scale;
  int64_t in_f, group;
  __device__ __forceinline__ Vector load(int64_t row, int64_t col) const {
    const int64_t e = row * in_f + col;  // groups of a row end with it (group divides in_f): scale index e / group
    return Vector{__ldcs(reinterpret_cast<const uint4*>(q + e)), scale[e / group]};
  }
  __device__ __forceinline__ static void decode(const Vector& v, float* w) {
    const int8_t* b = reinterpret_cast<const int8_t*>(&v.raw);
#pragma unroll
    for (int k = 0; k < 16; ++k) w[k] = __fmul_rn(static_cast<float>(b[k]), v.s);
  }
};

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_stochastic_round_int8(const void* x, int x_dtype, const float* scale, int8_t* out, int64_t n,
                                         int64_t group_size, uint64_t seed, uint64_t offset, int device, void* stream) {
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const uint64_t first = offset, last = first + static_cast<uint64_t>(n);
  const int64_t blocks = static_cast<int64_t>(((last + 3) >> 2) - (first >> 2));
  const unsigned grid = blocks_for(blocks, 65535LL * 16);
  const bool ok = dispatch_float(x_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    stochastic_round_int8_cuda_kernel<scalar_t><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const scalar_t*>(x), scale, out, first, last, group_size, seed, blocks);
  });
  return launch_status(ok);
}

WK_API int wk_cuda_int8_sr_update(int8_t* q, float* scale, const void* delta, int delta_dtype, int64_t groups,
                                  int64_t group_size, float decay, uint64_t seed, uint64_t offset,
                                  const float* found_inf, int device, void* stream) {
  if (groups == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const unsigned grid = static_cast<unsigned>((groups * 32 + kThreads - 1) / kThreads);  // one warp per group
  const bool ok = dispatch_float(delta_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    int8_sr_update_cuda_kernel<scalar_t><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        q, scale, static_cast<const scalar_t*>(delta), groups, group_size, decay, seed, offset, found_inf);
  });
  return launch_status(ok);
}

WK_API int wk_cuda_dequantize_int8(const int8_t* q, const float* scale, void* out, int out_dtype, int64_t in_f,
                                   int64_t group_size, int64_t r0, int64_t rows, int64_t c0, int64_t cols, int device,
                                   void* stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool vec = in_f % 16 == 0 && c0 % 16 == 0 && cols % 16 == 0 && aligned16(q) && aligned16(out);
  const bool ok = dispatch_float(out_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    out_t* o = static_cast<out_t*>(out);
    if (!vec) {
      dequantize_int8_kernel<out_t><<<blocks_for(n), kThreads, 0, st>>>(q, scale, o, in_f, group_size, r0, c0, cols, n);
    } else if (group_size % 16 == 0) {
      dequantize_int8_vec_kernel<out_t, true><<<blocks_for(n / 16), kThreads, 0, st>>>(q, scale, o, in_f, group_size,
                                                                                      r0, c0, cols, n / 16);
    } else {
      dequantize_int8_vec_kernel<out_t, false><<<blocks_for(n / 16), kThreads, 0, st>>>(q, scale, o, in_f, group_size,
                                                                                       r0, c0, cols, n / 16);
    }
  });
  return launch_status(ok);
}

WK_API int wk_cuda_int8_gemv(const void* x, int x_dtype, const int8_t* q, const float* scale, void* y, int64_t tokens,
                             int64_t out_f, int64_t in_f, int64_t group_size, int64_t rows_per_warp, int device,
                             void* stream) {
  if (in_f % 16 != 0 || group_size % 16 != 0 || in_f % group_size != 0 || !aligned16(q)) return cudaErrorInvalidValue;
  return launch_gemv(Int8Rows{q, scale, in_f, group_size}, x, x_dtype, y, tokens, out_f, in_f, rows_per_warp, device,
                     stream);
}
