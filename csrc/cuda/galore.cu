// CUDA kernel of the fused GaLore Adam step (spec: weightkit/ops/galore.py): the low-rank Adam update in one
// elementwise pass, then cuBLAS addmm_ writing straight into the weight.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../galore_epilogue.h"

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

void galore_adam_update_cuda(at::Tensor weight, const at::Tensor& low_grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                             const at::Tensor& ortho, bool left, double beta1, double beta2, double eps,
                             double step_size, double scale, double decay) {
  TORCH_CHECK(weight.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                  low_grad.is_contiguous() && ortho.is_contiguous(),
              "galore_adam_update_kernel: inputs must be contiguous");
  TORCH_CHECK(low_grad.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
                  exp_avg_sq.scalar_type() == at::kFloat && ortho.scalar_type() == at::kFloat,
              "galore_adam_update_kernel: low_grad, moments and ortho must be float32");
  const c10::cuda::CUDAGuard guard(weight.device());
  auto update = at::empty_like(low_grad);
  const int64_t n = low_grad.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  if (n > 0) {
    low_rank_adam_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        low_grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), update.data_ptr<float>(),
        n, static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  galore_apply_update(weight, ortho, update, left, step_size, scale, decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) { m.impl("galore_adam_update_kernel", &galore_adam_update_cuda); }

}  // namespace weightkit
