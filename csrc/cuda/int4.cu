// CUDA kernels for INT4 projection matrices (spec: weightkit/ops/int4.py). Divisions and roundings are the IEEE
// round-to-nearest intrinsics (__fdiv_rn, rintf) and the build uses --fmad=false, so results match the reference
// bit for bit. The INT4 matmul: up to 8 tokens of y = x W^T a GEMV reading the packed weight once (gemv.cuh);
// otherwise it dequantizes a block of rows (or columns) at a time to the activation dtype with
// wk_cuda_dequantize_int4 and multiplies it with cuBLAS through torch (weightkit/backends/cuda), on the same stream.
#include <cfloat>

#include "common.cuh"
#include "gemv.cuh"

namespace weightkit {
namespace {

// One warp per group: lanes reduce min/max, then each lane packs bytes (element pairs) of the group.
__global__ void quantize_int4_cuda_kernel(const float* __restrict__ x, uint8_t* __restrict__ packed,
                                          float* __restrict__ scale, uint8_t* __restrict__ zero, int64_t groups,
                                          int64_t gs) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (warp >= groups) return;
  const float* g = x + warp * gs;
  float lo = 0.0f, hi = 0.0f;  // the range always holds 0
  for (int64_t i = lane; i < gs; i += 32) {
    lo = fminf(lo, g[i]);
    hi = fmaxf(hi, g[i]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  const float s = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), 15.0f), FLT_MIN);
  const float z = fminf(fmaxf(rintf(__fdiv_rn(-lo, s)), 0.0f), 15.0f);
  for (int64_t j = lane; j < gs / 2; j += 32) {
    const float a = fminf(fmaxf(rintf(__fadd_rn(__fdiv_rn(g[2 * j], s), z)), 0.0f), 15.0f);
    const float b = fminf(fmaxf(rintf(__fadd_rn(__fdiv_rn(g[2 * j + 1], s), z)), 0.0f), 15.0f);
    packed[warp * (gs / 2) + j] = static_cast<uint8_t>(static_cast<unsigned>(a) | (static_cast<unsigned>(b) << 4));
  }
  if (lane == 0) {
    scale[warp] = s;
    zero[warp] = static_cast<uint8_t>(z);
  }
}

__device__ __forceinline__ float dequant_at(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                            const uint8_t* __restrict__ zero, int64_t e, int64_t gs) {
  const uint8_t byte = packed[e >> 1];
  const float q = static_cast<float>((e & 1) ? (byte >> 4) : (byte & 0xF));
  const int64_t g = e / gs;
  return __fmul_rn(__fsub_rn(q, static_cast<float>(zero[g])), scale[g]);
}

// The block W[r0 : r0 + rows, c0 : c0 + cols] of the dequantized matrix W (row length n_cols; groups run over the
// flat index) into out (rows x cols, row-major), each value (q - z) * s computed in fp32 (as the reference does) and
// rounded once to out_t. The dequantize_int4 op is the block of one row holding every value; int4_matmul's cuBLAS
// path dequantizes blocks of rows or columns to the activation dtype (weightkit/backends/_blocked.py).
template <typename out_t>
__global__ void dequantize_int4_cuda_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                            const uint8_t* __restrict__ zero, out_t* __restrict__ out, int64_t n_cols,
                                            int64_t gs, int64_t r0, int64_t c0, int64_t cols, int64_t n) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / cols;
    out[t] = from_float<out_t>(dequant_at(packed, scale, zero, (r0 + i) * n_cols + c0 + (t - i * cols), gs));
  }
}

// The same, bandwidth-bound: each thread dequantizes 32 consecutive values of a row from one 16-byte load (streamed,
// __ldcs: the packed weight is read once) and writes them with 16-byte stores; one (scale, zero) per vector when 32
// divides the group. The host takes it when every vector is 16-byte aligned.
template <typename out_t, bool kOneGroup>
__global__ void dequantize_int4_vec_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                           const uint8_t* __restrict__ zero, out_t* __restrict__ out, int64_t n_cols,
                                           int64_t gs, int64_t r0, int64_t c0, int64_t cols, int64_t vectors) {
  const int64_t per_row = cols / 32;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v / per_row, j = (v - i * per_row) * 32;
    const int64_t e = (r0 + i) * n_cols + c0 + j;  // flat index of the vector's first value (a multiple of 32)
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(packed + e / 2));
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
    float w[32];
    if (kOneGroup) {
      const int64_t g = e / gs;
      const float s = scale[g], z = static_cast<float>(zero[g]);
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        w[2 * k] = __fmul_rn(__fsub_rn(static_cast<float>(b[k] & 0xF), z), s);
        w[2 * k + 1] = __fmul_rn(__fsub_rn(static_cast<float>(b[k] >> 4), z), s);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        const int64_t g = (e + k) / gs;
        const float q = static_cast<float>((k & 1) ? (b[k / 2] >> 4) : (b[k / 2] & 0xF));
        w[k] = __fmul_rn(__fsub_rn(q, static_cast<float>(zero[g])), scale[g]);
      }
    }
    store16(out + i * cols + j, w);
    store16(out + i * cols + j + 16, w + 16);
  }
}

// int4_matmul's few-token GEMV (gemv.cuh) over INT4 rows: 32 weights (16 bytes, low nibble first) a load, one
// (scale, zero) each (32 divides the group; groups run over the flat index).
struct Int4Rows {
  static constexpr int kVals = 32;
  struct Vector {
    uint4 raw;
    float s, z;
  };
  const uint8_t* packed;
  const float* scale;
  const uint8_t* zero;
  int64_t cols, group;
  __device__ __forceinline__ Vector load(int64_t row, int64_t col) const {
    const int64_t e = row * cols + col, g = e / group;
    return Vector{__ldcs(reinterpret_cast<const uint4*>(packed + e / 2)), scale[g], static_cast<float>(zero[g])};
  }
  __device__ __forceinline__ static void decode(const Vector& v, float* w) {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&v.raw);
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      w[2 * k] = __fmul_rn(__fsub_rn(static_cast<float>(b[k] & 0xF), v.z), v.s);
      w[2 * k + 1] = __fmul_rn(__fsub_rn(static_cast<float>(b[k] >> 4), v.z), v.s);
    }
  }
};

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_quantize_int4(const float* x, uint8_t* packed, float* scale, uint8_t* zero, int64_t groups,
                                 int64_t group_size, int device, void* stream) {
  if (groups == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const unsigned grid = static_cast<unsigned>((groups * 32 + kThreads - 1) / kThreads);  // one warp per group
  quantize_int4_cuda_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, packed, scale, zero, groups,
                                                                                      group_size);
  return launch_status();
}

WK_API int wk_cuda_dequantize_int4(const uint8_t* packed, const float* scale, const uint8_t* zero, void* out,
                                   int out_dtype, int64_t n_cols, int64_t group_size, int64_t r0, int64_t rows,
                                   int64_t c0, int64_t cols, int device, void* stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool vec = n_cols % 32 == 0 && c0 % 32 == 0 && cols % 32 == 0 && aligned16(packed) && aligned16(out);
  const bool ok = dispatch_float(out_dtype, [&](auto tag) {
    using out_t = decltype(tag);
    out_t* o = static_cast<out_t*>(out);
    if (!vec) {
      dequantize_int4_cuda_kernel<out_t><<<blocks_for(n), kThreads, 0, st>>>(packed, scale, zero, o, n_cols,
                                                                              group_size, r0, c0, cols, n);
    } else if (group_size % 32 == 0) {
      dequantize_int4_vec_kernel<out_t, true><<<blocks_for(n / 32), kThreads, 0, st>>>(
          packed, scale, zero, o, n_cols, group_size, r0, c0, cols, n / 32);
    } else {
      dequantize_int4_vec_kernel<out_t, false><<<blocks_for(n / 32), kThreads, 0, st>>>(
          packed, scale, zero, o, n_cols, group_size, r0, c0, cols, n / 32);
    }
  });
  return launch_status(ok);
}

WK_API int wk_cuda_int4_gemv(const void* x, int x_dtype, const uint8_t* packed, const float* scale,
                             const uint8_t* zero, void* y, int64_t tokens, int64_t out_f, int64_t in_f,
                             int64_t group_size, int64_t rows_per_warp, int device, void* stream) {
  if (in_f % 32 != 0 || group_size % 32 != 0 || !aligned16(packed)) return cudaErrorInvalidValue;
  return launch_gemv(Int4Rows{packed, scale, zero, in_f, group_size}, x, x_dtype, y, tokens, out_f, in_f,
                     rows_per_warp, device, stream);
}
