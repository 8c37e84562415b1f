// CUDA kernels of the sparse-dense dictionary gather (spec: weightkit/ops/dictionary.py): one thread per output
// element for the forward and for grad_values (tokens summed in order); grad_z by atomics.
#include "common.cuh"

namespace weightkit {
namespace {

__global__ void gather_forward_kernel(const float* __restrict__ z, const float* __restrict__ v,
                                      const int64_t* __restrict__ idx, float* __restrict__ y, int64_t n, int64_t k,
                                      int64_t s, int64_t d_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * d_out;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / d_out, j = e % d_out;  // consecutive threads: consecutive j, coalesced v/idx/y
    float acc = 0.f;
    for (int64_t t = 0; t < s; ++t) acc += v[t * d_out + j] * z[r * k + idx[t * d_out + j]];
    y[e] = acc;
  }
}

__global__ void grad_z_kernel(const float* __restrict__ g, const float* __restrict__ v,
                              const int64_t* __restrict__ idx, float* __restrict__ gz, int64_t n, int64_t k, int64_t s,
                              int64_t d_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * d_out;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / d_out, j = e % d_out;
    const float gj = g[e];
    for (int64_t t = 0; t < s; ++t) atomicAdd(gz + r * k + idx[t * d_out + j], v[t * d_out + j] * gj);
  }
}

__global__ void grad_values_kernel(const float* __restrict__ g, const float* __restrict__ z,
                                   const int64_t* __restrict__ idx, float* __restrict__ gv, int64_t n, int64_t k,
                                   int64_t s, int64_t d_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < s * d_out;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % d_out, col = idx[e];
    float acc = 0.f;
    for (int64_t r = 0; r < n; ++r) acc += g[r * d_out + j] * z[r * k + col];
    gv[e] = acc;
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_dict_gather_forward(const float* z, const float* values, const int64_t* indices, float* y,
                                       int64_t n, int64_t k, int64_t s, int64_t d_out, int device, void* stream) {
  if (n * d_out == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  gather_forward_kernel<<<blocks_for(n * d_out, 65535LL * 16), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      z, values, indices, y, n, k, s, d_out);
  return launch_status();
}

WK_API int wk_cuda_dict_gather_backward(const float* grad, const float* z, const float* values, const int64_t* indices,
                                        float* gz, float* gv, int64_t n, int64_t k, int64_t s, int64_t d_out,
                                        int device, void* stream) {
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (n * d_out > 0) {
    grad_z_kernel<<<blocks_for(n * d_out, 65535LL * 16), kThreads, 0, st>>>(grad, values, indices, gz, n, k, s, d_out);
  }
  if (s * d_out > 0) {
    grad_values_kernel<<<blocks_for(s * d_out, 65535LL * 16), kThreads, 0, st>>>(grad, z, indices, gv, n, k, s, d_out);
  }
  return launch_status();
}
