// CUDA kernels of the sparse-dense dictionary gather (spec: weightkit/ops/dictionary.py): one thread per output
// element for the forward and for grad_values (tokens summed in order); grad_z by atomics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace weightkit {
namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 16); }

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

at::Tensor dict_sparse_gather_cuda(const at::Tensor& z, const at::Tensor& values, const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), k = z.size(1), s = values.size(0), d_out = values.size(1);
  const at::Tensor zf = z.to(at::kFloat).contiguous(), vf = values.to(at::kFloat).contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  auto y = at::empty({n, d_out}, zf.options());
  if (n * d_out > 0) {
    gather_forward_kernel<<<blocks_for(n * d_out), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        zf.data_ptr<float>(), vf.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), n, k, s, d_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> dict_sparse_gather_backward_cuda(const at::Tensor& grad, const at::Tensor& z,
                                                                     const at::Tensor& values,
                                                                     const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), k = z.size(1), s = values.size(0), d_out = values.size(1);
  const at::Tensor gf = grad.to(at::kFloat).contiguous(), zf = z.to(at::kFloat).contiguous();
  const at::Tensor vf = values.to(at::kFloat).contiguous(), idx = indices.to(at::kLong).contiguous();
  auto gz = at::zeros({n, k}, zf.options());
  auto gv = at::empty({s, d_out}, zf.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (n * d_out > 0) {
    grad_z_kernel<<<blocks_for(n * d_out), kThreads, 0, stream>>>(gf.data_ptr<float>(), vf.data_ptr<float>(),
                                                                   idx.data_ptr<int64_t>(), gz.data_ptr<float>(), n, k,
                                                                   s, d_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (s * d_out > 0) {
    grad_values_kernel<<<blocks_for(s * d_out), kThreads, 0, stream>>>(gf.data_ptr<float>(), zf.data_ptr<float>(),
                                                                        idx.data_ptr<int64_t>(), gv.data_ptr<float>(),
                                                                        n, k, s, d_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gz.to(z.scalar_type()), gv.to(values.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) {
  m.impl("dict_sparse_gather_kernel", &dict_sparse_gather_cuda);
  m.impl("dict_sparse_gather_backward_kernel", &dict_sparse_gather_backward_cuda);
}

}  // namespace weightkit
