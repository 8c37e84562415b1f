// CUDA kernels of the MemoryFormer lookup (spec: weightkit/ops/memory.py).
// Forward: one block per token; the block hashes the K chunks into shared memory, then each thread accumulates
// its output columns in fp32 (column loop handles any d_out). Backward: one block per token computes
// <g, T[k, h_k]> by a block reduction and the input gradient; the table gradient uses atomics, or, when
// deterministic, a stable sort of (table, bucket) keys and one thread per (bucket, column) summing its tokens in
// order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace weightkit {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoidf_dev(float v) { return 1.0f / (1.0f + __expf(-v)); }

template <typename xt>
__device__ void hash_all(const xt* z, int64_t K, int tau, float inv_t2, int64_t* h, float* p) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    int64_t bucket = 0;
    float w = 1.0f;
    for (int i = 0; i < tau; ++i) {
      const float v = static_cast<float>(z[k * tau + i]);
      if (v > 0.f) bucket |= int64_t{1} << i;
      w *= sigmoidf_dev(fabsf(v) * inv_t2);
    }
    h[k] = bucket;
    p[k] = w;
  }
}

template <typename xt, typename tt>
__global__ void memory_forward_kernel(const xt* __restrict__ x, const tt* __restrict__ tables, xt* __restrict__ y,
                                      int64_t K, int tau, int64_t buckets, int64_t d_out, float inv_t2) {
  extern __shared__ unsigned char smem[];
  int64_t* h = reinterpret_cast<int64_t*>(smem);
  float* p = reinterpret_cast<float*>(h + K);
  const int64_t r = blockIdx.x;
  hash_all(x + r * K * tau, K, tau, inv_t2, h, p);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < d_out; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += p[k] * static_cast<float>(tables[(k * buckets + h[k]) * d_out + j]);
    y[r * d_out + j] = static_cast<xt>(acc);
  }
}

__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < (blockDim.x + 31) / 32; ++w) total += scratch[w];
    scratch[32] = total;
  }
  __syncthreads();
  total = scratch[32];
  __syncthreads();
  return total;
}

__global__ void memory_backward_kernel(const float* __restrict__ g, const float* __restrict__ x,
                                       const float* __restrict__ tables, float* __restrict__ gx,
                                       float* __restrict__ gt, int64_t* __restrict__ hs, float* __restrict__ ps,
                                       int64_t K, int tau, int64_t buckets, int64_t d_out, float inv_t2,
                                       bool atomics) {
  extern __shared__ unsigned char smem[];
  int64_t* h = reinterpret_cast<int64_t*>(smem);
  float* p = reinterpret_cast<float*>(h + K);
  __shared__ float scratch[33];
  const int64_t r = blockIdx.x;
  const float* z = x + r * K * tau;
  hash_all(z, K, tau, inv_t2, h, p);
  __syncthreads();
  for (int64_t k = 0; k < K; ++k) {
    const float* row = tables + (k * buckets + h[k]) * d_out;
    float partial = 0.f;
    for (int64_t j = threadIdx.x; j < d_out; j += blockDim.x) {
      partial += g[r * d_out + j] * row[j];
      if (atomics) atomicAdd(gt + (k * buckets + h[k]) * d_out + j, p[k] * g[r * d_out + j]);
    }
    const float dot = block_sum(partial, scratch);
    for (int i = threadIdx.x; i < tau; i += blockDim.x) {
      const float v = z[k * tau + i];
      const float sgn = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
      gx[r * K * tau + k * tau + i] = dot * p[k] * inv_t2 * sgn * sigmoidf_dev(-fabsf(v) * inv_t2);
    }
    if (threadIdx.x == 0) {
      hs[r * K + k] = k * buckets + h[k];
      ps[r * K + k] = p[k];
    }
  }
}

// Deterministic table gradient: keys sorted stably (token order kept inside a bucket); segment s covers
// order[starts[s] .. starts[s+1]); each thread owns one (segment, column) and sums in that order.
__global__ void segment_sum_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                                   const int64_t* __restrict__ seg_keys, const float* __restrict__ ps,
                                   const float* __restrict__ g, float* __restrict__ gt, int64_t segments, int64_t K,
                                   int64_t d_out) {
  const int64_t s = blockIdx.x;
  if (s >= segments) return;
  for (int64_t j = threadIdx.x; j < d_out; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = starts[s]; e < starts[s + 1]; ++e) {
      const int64_t flat = order[e];  // index into the (n, K) arrays
      acc += ps[flat] * g[(flat / K) * d_out + j];
    }
    gt[seg_keys[s] * d_out + j] = acc;
  }
}

at::Tensor memory_lookup_forward_cuda(const at::Tensor& x, const at::Tensor& tables, double t) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && tables.is_contiguous(), "memory_lookup_forward_kernel: bad inputs");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), K = tables.size(0), buckets = tables.size(1), d_out = tables.size(2);
  const int tau = static_cast<int>(std::log2(static_cast<double>(buckets)));
  auto y = at::empty({n, d_out}, x.options());
  if (n == 0) return y;
  const size_t shared = K * (sizeof(int64_t) + sizeof(float));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memory_fwd_x", [&] {
    using xt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables.scalar_type(), "memory_fwd_t", [&] {
      memory_forward_kernel<xt, scalar_t><<<n, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<xt>(), tables.data_ptr<scalar_t>(), y.data_ptr<xt>(), K, tau, buckets, d_out,
          static_cast<float>(2.0 / t));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> memory_lookup_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& tables, double t,
                                                                bool deterministic) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), K = tables.size(0), buckets = tables.size(1), d_out = tables.size(2);
  const int tau = static_cast<int>(std::log2(static_cast<double>(buckets)));
  const at::Tensor xf = x.to(at::kFloat).contiguous(), gf = grad.to(at::kFloat).contiguous();
  const at::Tensor tf = tables.to(at::kFloat).contiguous();
  auto gx = at::empty({n, K * tau}, xf.options());
  auto gt = at::zeros({K, buckets, d_out}, tf.options());
  auto keys = at::empty({n, K}, xf.options().dtype(at::kLong));
  auto ps = at::empty({n, K}, xf.options());
  if (n > 0) {
    const size_t shared = K * (sizeof(int64_t) + sizeof(float));
    memory_backward_kernel<<<n, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        gf.data_ptr<float>(), xf.data_ptr<float>(), tf.data_ptr<float>(), gx.data_ptr<float>(), gt.data_ptr<float>(),
        keys.data_ptr<int64_t>(), ps.data_ptr<float>(), K, tau, buckets, d_out, static_cast<float>(2.0 / t),
        !deterministic);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (deterministic) {
      auto sorted = at::sort(keys.reshape(-1), /*stable=*/true);
      const at::Tensor sorted_keys = std::get<0>(sorted), order = std::get<1>(sorted);
      auto uniq = at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true);
      const at::Tensor seg_keys = std::get<0>(uniq), counts = std::get<2>(uniq);
      const at::Tensor starts = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
      const int64_t segments = seg_keys.numel();
      segment_sum_kernel<<<segments, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), seg_keys.data_ptr<int64_t>(), ps.data_ptr<float>(),
          gf.data_ptr<float>(), gt.data_ptr<float>(), segments, K, d_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {gx.to(x.scalar_type()), gt.to(tables.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CUDA, m) {
  m.impl("memory_lookup_forward_kernel", &memory_lookup_forward_cuda);
  m.impl("memory_lookup_backward_kernel", &memory_lookup_backward_cuda);
}

}  // namespace weightkit
