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

// Dequantize rows [r0, r0 + rows) of w_q into buf (float32, rows x in_f).
__global__ void dequantize_rows_kernel(const int8_t* __restrict__ q, const float* __restrict__ s,
                                       float* __restrict__ buf, int64_t r0, int64_t rows, int64_t in_f,
                                       int64_t group) {
  const int64_t n = rows * in_f, base = r0 * in_f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    buf[i] = static_cast<float>(q[base + i]) * s[(base + i) / group];
  }
}

// y = x W^T or x W with W = dequant(w_q), a block of rows of W at a time (cuBLAS for the products).
at::Tensor int8_matmul_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale, int64_t group_size,
                            bool transpose) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w_q.is_contiguous() && scale.is_contiguous(),
              "int8_matmul_kernel: x must be 2-D and inputs contiguous");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out_f = w_q.size(0), in_f = w_q.size(1), tokens = x.size(0);
  const int64_t kRows = std::max<int64_t>(1, std::min<int64_t>(out_f, (int64_t{1} << 24) / std::max<int64_t>(in_f, 1)));
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y = at::zeros({tokens, transpose ? in_f : out_f}, x.options().dtype(at::kFloat));
  at::Tensor buf = at::empty({kRows, in_f}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < out_f; r0 += kRows) {
    const int64_t rows = std::min(out_f - r0, kRows);
    at::Tensor block = buf.narrow(0, 0, rows);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows * in_f + threads - 1) / threads, 65535LL * 8);
    dequantize_rows_kernel<<<blocks, threads, 0, stream>>>(w_q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                                           block.data_ptr<float>(), r0, rows, in_f, group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (transpose) {
      y.addmm_(xf.narrow(1, r0, rows), block);
    } else {
      y.narrow(1, r0, rows).copy_(at::mm(xf, block.t()));
    }
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) {
  m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cuda);
  m.impl("int8_matmul_kernel", &int8_matmul_cuda);
}

}  // namespace weightkit
