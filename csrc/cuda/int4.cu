// CUDA kernels for INT4 projection matrices (spec: weightkit/ops/int4.py). Divisions and roundings are the IEEE
// round-to-nearest intrinsics (__fdiv_rn, rintf) and the build uses --fmad=false, so results match the reference
// bit for bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>

#include "../dequant_matmul.h"

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cuda(const at::Tensor& x, int64_t group_size) {
  TORCH_CHECK(x.is_contiguous(), "quantize_int4_kernel: x must be contiguous");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && x.numel() % group_size == 0,
              "quantize_int4_kernel: bad group_size");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t n = xf.numel(), groups = n / group_size;
  auto packed = at::empty({n / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({groups}, x.options().dtype(at::kFloat));
  auto zero = at::empty({groups}, x.options().dtype(at::kByte));
  if (groups == 0) return {packed, scale, zero};
  const int threads = 256;
  const int64_t blocks = (groups * 32 + threads - 1) / threads;
  quantize_int4_cuda_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      xf.data_ptr<float>(), packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<uint8_t>(), groups,
      group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scale, zero};
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

void launch_dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, float* out,
                       int64_t e0, int64_t n, int64_t gs) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  dequantize_int4_cuda_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<uint8_t>(), out, e0, n, gs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                                int64_t group_size) {
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "dequantize_int4_kernel: inputs must be contiguous");
  const int64_t n = packed.numel() * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && n % group_size == 0 && scale.numel() == n / group_size,
              "dequantize_int4_kernel: bad group_size");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({n}, scale.options());
  launch_dequantize(packed, scale, zero, out.data_ptr<float>(), 0, n, group_size);
  return out;
}

// y = x W^T or x W with W (rows x cols) the dequantized INT4 matrix (see ../dequant_matmul.h), cuBLAS products.
at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t group_size, int64_t rows, int64_t cols, bool transpose) {
  TORCH_CHECK(x.dim() == 2 && packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "int4_matmul_kernel: x must be 2-D and the INT4 matrix contiguous");
  TORCH_CHECK(packed.numel() * 2 == rows * cols, "int4_matmul_kernel: packed does not hold rows x cols values");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t block_rows = (int64_t{1} << 24) / std::max<int64_t>(cols, 1);  // up to 16M values per block
  return blocked_dequant_matmul(x, rows, cols, transpose, block_rows, [&](float* dst, int64_t r0, int64_t nr) {
    launch_dequantize(packed, scale, zero, dst, r0 * cols, nr * cols, group_size);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) {
  m.impl("quantize_int4_kernel", &quantize_int4_cuda);
  m.impl("dequantize_int4_kernel", &dequantize_int4_cuda);
  m.impl("int4_matmul_kernel", &int4_matmul_cuda);
}

}  // namespace weightkit
