// CUDA kernels of the MemoryFormer lookup (spec: weightkit/ops/memoryformer.py).
// Forward: one block per token; the block hashes the K chunks into shared memory, then each thread accumulates
// its output columns in fp32 (column loop handles any d_out). Backward: one block per token computes
// <g, T[k, h_k]> by a block reduction and the input gradient; the table gradient uses atomics, or, when
// deterministic, a stable sort of (table, bucket) keys (torch.sort, called
// by weightkit/native.py between the two launches) and one block per (sorted position, column tile) of which
// only segment starts work, summing their bucket's tokens in order (no host sync, O(n K) extra memory).
#include "common.cuh"

namespace weightkit {
namespace {


__device__ __forceinline__ float sigmoidf_dev(float v) { return 1.0f / (1.0f + __expf(-v)); }

template <typename xt>
__device__ void hash_all(const xt* z, int64_t K, int tau, float inv_t2, int64_t* h, float* p) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    int64_t bucket = 0;
    float w = 1.0f;
    for (int i = 0; i < tau; ++i) {
      const float v = to_float(z[k * tau + i]);
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
    for (int64_t k = 0; k < K; ++k) acc += p[k] * to_float(tables[(k * buckets + h[k]) * d_out + j]);
    y[r * d_out + j] = from_float<xt>(acc);
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

// Deterministic table gradient over a stable sort of the (table, bucket) keys (token order kept inside a key).
// Position e of the sorted order starts a segment when e == 0 or its key differs from the one before; the block
// of a segment start walks the segment in order and writes its column tile of gt[key] (fp32 sums, token order),
// every other block returns at once. The grid (positions x column tiles) comes from shapes alone: no count of
// segments is read back, so nothing waits on the host, and the only extra memory is the sort's O(n K).
constexpr int kSegCols = 4;  // columns per thread: a tile is kThreads * kSegCols columns
constexpr int64_t kMaxGridX = 2147483647, kMaxGridY = 65535;

__global__ void segment_sum_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                   const float* __restrict__ ps, const float* __restrict__ g, float* __restrict__ gt,
                                   int64_t total, int64_t K, int64_t d_out) {
  const int64_t tile_cols = static_cast<int64_t>(blockDim.x) * kSegCols;
  const int64_t tiles = (d_out + tile_cols - 1) / tile_cols;
  for (int64_t e = blockIdx.x; e < total; e += gridDim.x) {
    const int64_t key = sorted_keys[e];
    if (e > 0 && sorted_keys[e - 1] == key) continue;  // not a segment start (uniform across the block)
    for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
      const int64_t j0 = tile * tile_cols + threadIdx.x;
      if (j0 >= d_out) continue;
      float acc[kSegCols];
#pragma unroll
      for (int i = 0; i < kSegCols; ++i) acc[i] = 0.f;
      for (int64_t f = e; f < total && sorted_keys[f] == key; ++f) {
        const int64_t flat = order[f];  // index into the (n, K) arrays: token flat / K, table flat % K
        const float p = ps[flat];
        const float* grow = g + (flat / K) * d_out;
#pragma unroll
        for (int i = 0; i < kSegCols; ++i) {
          const int64_t j = j0 + static_cast<int64_t>(i) * blockDim.x;
          if (j < d_out) acc[i] += p * grow[j];
        }
      }
      float* out = gt + key * d_out;
#pragma unroll
      for (int i = 0; i < kSegCols; ++i) {
        const int64_t j = j0 + static_cast<int64_t>(i) * blockDim.x;
        if (j < d_out) out[j] = acc[i];
      }
    }
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_memory_lookup_forward(const void* x, int x_dtype, const void* tables, int tables_dtype, void* y,
                                         int64_t n, int64_t K, int64_t buckets, int64_t d_out, int tau, double t,
                                         int device, void* stream) {
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const size_t shared = K * (sizeof(int64_t) + sizeof(float));
  bool tables_ok = true;
  const bool x_ok = dispatch_float(x_dtype, [&](auto xtag) {
    using xt = decltype(xtag);
    tables_ok = dispatch_float(tables_dtype, [&](auto ttag) {
      using tt = decltype(ttag);
      memory_forward_kernel<xt, tt><<<static_cast<unsigned>(n), kThreads, shared, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const xt*>(x), static_cast<const tt*>(tables), static_cast<xt*>(y), K, tau, buckets, d_out,
          static_cast<float>(2.0 / t));
    });
  });
  return launch_status(x_ok && tables_ok);
}

WK_API int wk_cuda_memory_lookup_backward(const float* grad, const float* x, const float* tables, float* gx, float* gt,
                                          int64_t* keys, float* ps, int64_t n, int64_t K, int64_t buckets,
                                          int64_t d_out, int tau, double t, int atomics, int device, void* stream) {
  if (n == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const size_t shared = K * (sizeof(int64_t) + sizeof(float));
  memory_backward_kernel<<<static_cast<unsigned>(n), kThreads, shared, static_cast<cudaStream_t>(stream)>>>(
      grad, x, tables, gx, gt, keys, ps, K, tau, buckets, d_out, static_cast<float>(2.0 / t), atomics != 0);
  return launch_status();
}

WK_API int wk_cuda_memory_segment_sum(const int64_t* sorted_keys, const int64_t* order, const float* ps,
                                      const float* grad, float* gt, int64_t total, int64_t K, int64_t d_out,
                                      int device, void* stream) {
  if (total == 0 || d_out == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const int64_t tile_cols = static_cast<int64_t>(kThreads) * kSegCols;
  const dim3 grid(static_cast<unsigned>(std::min(total, kMaxGridX)),
                  static_cast<unsigned>(std::min((d_out + tile_cols - 1) / tile_cols, kMaxGridY)));
  segment_sum_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(sorted_keys, order, ps, grad, gt, total,
                                                                               K, d_out);
  return launch_status();
}
