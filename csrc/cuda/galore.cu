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
