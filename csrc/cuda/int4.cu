// CUDA kernels for INT4 projection matrices (spec: weightkit/ops/int4.py). Divisions and roundings are the IEEE
// round-to-nearest intrinsics (__fdiv_rn, rintf) and the build uses --fmad=false, so results match the reference
// bit for bit. The INT4 matmul dequantizes a block of rows at a time with wk_cuda_dequantize_int4 and multiplies it
// with cuBLAS through torch (weightkit/backends/cuda), on the same stream.
#include <cfloat>

#include "common.cuh"

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

// out[i] = W_flat[e0 + i] for i < n.
__global__ void dequantize_int4_cuda_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scale,
                                            const uint8_t* __restrict__ zero, float* __restrict__ out, int64_t e0,
                                            int64_t n, int64_t gs) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = dequant_at(packed, scale, zero, e0 + i, gs);
  }
}

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

WK_API int wk_cuda_dequantize_int4(const uint8_t* packed, const float* scale, const uint8_t* zero, float* out,
                                   int64_t group_size, int64_t e0, int64_t n, int device, void* stream) {
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  dequantize_int4_cuda_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, scale, zero, out, e0, n, group_size);
  return launch_status();
}
