// CUDA kernels for INT8 stochastic rounding (spec: weightkit/ops/int8.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../dequant_matmul.h"
#include "../philox.h"

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
      float v = floorf(__fadd_rn(__fmul_rn(static_cast<float>(x[i]), inv), bits_to_uniform(r.v[lane])));
      v = fminf(fmaxf(v, -128.f), 127.f);
      q[i] = static_cast<int8_t>(v);
      ++rem;
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

// Fused Q-GaLore weight update (spec: int8_sr_update_ in weightkit/ops/int8.py): one warp per group; lanes
// reduce max|w|, then each lane rounds its elements with the Philox value of its stream position.
template <typename scalar_t>
__global__ void int8_sr_update_cuda_kernel(int8_t* __restrict__ q, float* __restrict__ scale,
                                           const scalar_t* __restrict__ delta, int64_t groups, int64_t gs,
                                           float decay, uint64_t seed, uint64_t offset) {
  const int lane = threadIdx.x & 31;
  const int64_t g = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (g >= groups) return;
  int8_t* qg = q + g * gs;
  const scalar_t* dg = delta + g * gs;
  const float s = scale[g];
  float amax = 0.0f;
  for (int64_t i = lane; i < gs; i += 32) {
    const float w = __fmul_rn(__fadd_rn(__fmul_rn(static_cast<float>(qg[i]), s), static_cast<float>(dg[i])), decay);
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
                                            static_cast<float>(dg[i + j])), decay);
        float v = floorf(__fadd_rn(__fmul_rn(w, inv), bits_to_uniform(r.v[j])));
        qg[i + j] = static_cast<int8_t>(fminf(fmaxf(v, -128.f), 127.f));
      }
    }
  } else {
    for (int64_t i = lane; i < gs; i += 32) {
      const float w = __fmul_rn(__fadd_rn(__fmul_rn(static_cast<float>(qg[i]), s), static_cast<float>(dg[i])), decay);
      const uint64_t pos = base + static_cast<uint64_t>(i);
      const Philox4 r = philox4x32_10(pos >> 2, seed);
      float v = floorf(__fadd_rn(__fmul_rn(w, inv), bits_to_uniform(r.v[pos & 3])));
      v = fminf(fmaxf(v, -128.f), 127.f);
      qg[i] = static_cast<int8_t>(v);
    }
  }
  if (lane == 0) scale[g] = ns;
}

void int8_sr_update_cuda(at::Tensor w_q, at::Tensor scale, const at::Tensor& delta, int64_t group_size, double decay,
                         int64_t seed, int64_t offset) {
  TORCH_CHECK(w_q.is_contiguous() && scale.is_contiguous() && delta.is_contiguous(),
              "int8_sr_update_kernel: inputs must be contiguous");
  TORCH_CHECK(group_size > 0 && w_q.numel() % group_size == 0 && scale.numel() == w_q.numel() / group_size,
              "int8_sr_update_kernel: bad group_size");
  const c10::cuda::CUDAGuard guard(w_q.device());
  const int64_t groups = scale.numel();
  if (groups == 0) return;
  const int threads = 256;
  const int64_t blocks = (groups * 32 + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "int8_sr_update_cuda", [&] {
    int8_sr_update_cuda_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        w_q.data_ptr<int8_t>(), scale.data_ptr<float>(), delta.data_ptr<scalar_t>(), groups, group_size,
        static_cast<float>(decay), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t out_f = w_q.size(0), in_f = w_q.size(1);
  const int64_t kRows = (int64_t{1} << 24) / std::max<int64_t>(in_f, 1);  // up to 16M values per block
  auto stream = c10::cuda::getCurrentCUDAStream();
  return blocked_dequant_matmul(x, out_f, in_f, transpose, kRows, [&](float* dst, int64_t r0, int64_t rows) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((rows * in_f + threads - 1) / threads, 65535LL * 8);
    dequantize_rows_kernel<<<blocks, threads, 0, stream>>>(w_q.data_ptr<int8_t>(), scale.data_ptr<float>(), dst, r0,
                                                           rows, in_f, group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) {
  m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cuda);
  m.impl("int8_matmul_kernel", &int8_matmul_cuda);
  m.impl("int8_sr_update_kernel", &int8_sr_update_cuda);
}

}  // namespace weightkit
