// CUDA kernel of the fused GaLore Adam step (spec: weightkit/ops/galore.py): the low-rank Adam update in one
// elementwise pass; the projection back into the weight (cuBLAS addmm_ straight into W) is done by torch in
// weightkit/backends/cuda on the same stream.
#include "common.cuh"

namespace weightkit {
namespace {

__global__ void low_rank_adam_kernel(const float* __restrict__ r, float* __restrict__ m, float* __restrict__ v,
                                     float* __restrict__ u, int64_t n, float b1, float b2, float eps) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = r[i];
    const float mi = m[i] * b1 + (1.0f - b1) * g;
    const float vi = v[i] * b2 + (1.0f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    u[i] = mi / (sqrtf(vi) + eps);
  }
}

// The exact bf16 parts of one value, written at o, o + step (, o + 2 step): a float32's three (each the nearest bf16
// of what the previous ones left; NaN stays NaN), a float16's two (hi: its three lowest significand bits cleared).
__device__ __forceinline__ void write_parts(float v, __nv_bfloat16* o, int64_t step) {
  const __nv_bfloat16 hi = __float2bfloat16_rn(v);
  const float rest = v - __bfloat162float(hi);
  const __nv_bfloat16 mid = __float2bfloat16_rn(rest);
  o[0] = hi;
  o[step] = mid;
  o[2 * step] = __float2bfloat16_rn(rest - __bfloat162float(mid));  // exact: at most 8 significant bits
}

__device__ __forceinline__ void write_parts(__half v, __nv_bfloat16* o, int64_t step) {
  const __half hi = __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(v) & 0xFFF8u));
  const float h = __half2float(hi);
  o[0] = __float2bfloat16_rn(h);                       // 8 significant bits: exact
  o[step] = __float2bfloat16_rn(__half2float(v) - h);  // exact difference, at most 3 significant bits
}

// Rows by grid.y (striding), columns by grid.x x threads (striding); out's rows contiguous.
template <typename T>
__global__ void bf16_parts_kernel(const T* __restrict__ x, __nv_bfloat16* __restrict__ out, int64_t rows,
                                  int64_t cols, int64_t stride_xr, int64_t stride_xc, int64_t stride_or,
                                  int64_t part_step) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      write_parts(x[r * stride_xr + c * stride_xc], out + r * stride_or + c, part_step);
    }
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_low_rank_adam(const float* r, float* m, float* v, float* u, int64_t n, float beta1, float beta2,
                                 float eps, int device, void* stream) {
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  low_rank_adam_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(r, m, v, u, n, beta1,
                                                                                          beta2, eps);
  return launch_status();
}

WK_API int wk_cuda_bf16_parts(const void* x, int x_dtype, void* out, int64_t rows, int64_t cols, int64_t stride_xr,
                              int64_t stride_xc, int64_t stride_or, int64_t part_step, int device, void* stream) {
  if (x_dtype != WK_F32 && x_dtype != WK_F16) return launch_status(false);
  if (rows == 0 || cols == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 1024)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  auto* o = static_cast<__nv_bfloat16*>(out);
  const auto s = static_cast<cudaStream_t>(stream);
  if (x_dtype == WK_F32) {
    bf16_parts_kernel<float><<<grid, kThreads, 0, s>>>(static_cast<const float*>(x), o, rows, cols, stride_xr,
                                                       stride_xc, stride_or, part_step);
  } else {
    bf16_parts_kernel<__half><<<grid, kThreads, 0, s>>>(static_cast<const __half*>(x), o, rows, cols, stride_xr,
                                                        stride_xc, stride_or, part_step);
  }
  return launch_status();
}
