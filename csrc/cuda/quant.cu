// CUDA kernels for INT8 stochastic rounding (spec: weightkit/ops/quant.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../philox.h"

namespace weightkit {
namespace {

// One thread per Philox block of four consecutive stream positions.
template <typename scalar_t>
__global__ void stochastic_round_int8_cuda_kernel(const scalar_t* __restrict__ x, const float* __restrict__ scale,
                                                  int8_t* __restrict__ q, uint64_t first, uint64_t last,
                                                  int64_t group_size, uint64_t seed, int64_t blocks) {
  const int64_t block0 = static_cast<int64_t>(first >> 2);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < blocks;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t b = static_cast<uint64_t>(block0 + t);
    const Philox4 r = philox4x32_10(b, seed);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t g = b * 4 + lane;
      if (g < first || g >= last) continue;
      const int64_t i = static_cast<int64_t>(g - first);
      const float inv = __fdiv_rn(1.0f, scale[i / group_size]);
      float v = floorf(__fadd_rn(__fmul_rn(static_cast<float>(x[i]), inv), bits_to_uniform(r.v[lane])));
      v = fminf(fmaxf(v, -128.f), 127.f);
      q[i] = static_cast<int8_t>(v);
    }
  }
}

at::Tensor stochastic_round_int8_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t group_size, int64_t seed,
                                      int64_t offset) {
  TORCH_CHECK(x.is_contiguous() && scale.is_contiguous(), "stochastic_round_int8_kernel: inputs must be contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "stochastic_round_int8_kernel: scale must be float32");
  TORCH_CHECK(group_size > 0 && x.numel() % group_size == 0, "stochastic_round_int8_kernel: bad group_size");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const uint64_t first = static_cast<uint64_t>(offset), last = first + static_cast<uint64_t>(n);
  const int64_t blocks = static_cast<int64_t>(((last + 3) >> 2) - (first >> 2));
  const int threads = 256;
  const int64_t grid = std::min<int64_t>((blocks + threads - 1) / threads, 65535LL * 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stochastic_round_int8_cuda", [&] {
    stochastic_round_int8_cuda_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), scale.data_ptr<float>(), out.data_ptr<int8_t>(), first, last, group_size,
        static_cast<uint64_t>(seed), blocks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) { m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cuda); }

}  // namespace weightkit
