// CUDA kernels of the MemoryFormer lookup (spec: weightkit/ops/memoryformer.py).
// Forward: a grid of (token blocks, column tiles, table splits), so one decode token spreads over the whole GPU;
// splits combined in a fixed order (memory_forward_kernel). Backward: a warp per (token, table) pair for the input
// gradient (and, in atomics mode, the fp32 table gradient); otherwise the table gradient is a sorted segment
// reduction (segment_rows_kernel) over the pairs stably sorted by row key (rank_keys_kernel, a counting sort per
// table; torch.sort + torch.searchsorted above 1024 buckets): no host sync, every row written once.
#include "common.cuh"

namespace weightkit {
namespace {


__device__ __forceinline__ float sigmoidf_dev(float v) { return 1.0f / (1.0f + __expf(-v)); }

// Forward: y[t] = sum_k p[t, k] T[k, h[t, k]]. Block (token block of TB tokens, column tile, table split): the
// block's 8 warps share the tile (32 lanes x VEC columns: 16 B per lane, 256 B per row in bf16) and take the split's
// tables in turn (warp w: tables w, w + 8, ...), TB tokens x kUnroll tables of independent 16-B row loads in flight
// per lane. The (token, table) pairs of each step are hashed into shared memory first (kStage tables at a time).
// The warps' fp32 sums are added in warp order through shared memory; with one split the block writes y, else its
// fp32 partial [split, n, d_out], and the last block of its (token block, tile) to finish (a counter per tile) adds
// the partials in split order 0, 1, ... and writes y. Every sum has a fixed order: the bits do not depend on timing.
constexpr int64_t kMaxGridX = 2147483647, kMaxGridY = 65535;
constexpr int kFwdWarps = 8;
constexpr int kFwdThreads = kFwdWarps * 32;
constexpr int kStage = 64;
constexpr int kUnroll = 2;

template <typename tt>
struct Vec16 {  // kVec = 16 / sizeof(tt) consecutive table values, one 16-B load
  static constexpr int kVec = 16 / sizeof(tt);
  uint4 raw;
  __device__ __forceinline__ tt& operator[](int i) { return reinterpret_cast<tt*>(&raw)[i]; }
};

template <typename xt, typename tt, int TB, bool VECTOR>
__global__ void __launch_bounds__(kFwdThreads) memory_forward_kernel(
    const xt* __restrict__ x, const tt* __restrict__ tables, xt* __restrict__ y, float* __restrict__ partials,
    unsigned* __restrict__ counters, int64_t n, int64_t K, int tau, int64_t buckets, int64_t d_out, float inv_t2,
    int64_t chunk) {
  constexpr int VEC = Vec16<tt>::kVec;
  constexpr int TILE = 32 * VEC;
  __shared__ int64_t s_off[TB][kStage];
  __shared__ float s_p[TB][kStage];
  __shared__ float s_red[kFwdWarps][TB][TILE];
  __shared__ bool s_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TB;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * TILE;
  const int64_t col = c0 + lane * VEC;
  const int64_t k_lo = static_cast<int64_t>(blockIdx.z) * chunk, k_hi = std::min(K, k_lo + chunk);
  float acc[TB][VEC];
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[b][v] = 0.f;
  for (int64_t kb = k_lo; kb < k_hi; kb += kStage) {
    const int nk = static_cast<int>(std::min<int64_t>(kStage, k_hi - kb));
    for (int i = threadIdx.x; i < TB * kStage; i += kFwdThreads) {
      const int b = i / kStage, j = i % kStage;
      const int64_t t = t0 + b, k = kb + j;
      int64_t off = 0;
      float p = 0.f;
      if (t < n && j < nk) {
        const xt* z = x + (t * K + k) * tau;
        int64_t h = 0;
        p = 1.f;
        for (int e = 0; e < tau; ++e) {
          const float v = to_float(z[e]);
          if (v > 0.f) h |= int64_t{1} << e;
          p *= sigmoidf_dev(fabsf(v) * inv_t2);
        }
        off = (k * buckets + h) * d_out;
      }
      s_off[b][j] = off;
      s_p[b][j] = p;
    }
    __syncthreads();
    for (int j = warp; j < nk; j += kFwdWarps * kUnroll) {
      Vec16<tt> r[kUnroll][TB];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          const int jj = j + u * kFwdWarps;
          r[u][b].raw = make_uint4(0u, 0u, 0u, 0u);
          if (jj < nk && t0 + b < n) {
            const tt* src = tables + s_off[b][jj] + col;
            if (VECTOR) {
              if (col < d_out) r[u][b].raw = __ldg(reinterpret_cast<const uint4*>(src));
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v)
                if (col + v < d_out) r[u][b][v] = src[v];
            }
          }
        }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          const int jj = j + u * kFwdWarps;
          const float p = jj < nk ? s_p[b][jj] : 0.f;
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[b][v] = fmaf(p, to_float(r[u][b][v]), acc[b][v]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int v = 0; v < VEC; ++v) s_red[warp][b][lane * VEC + v] = acc[b][v];
  __syncthreads();
  // thread i: elements i, i + 256, ... of the [TB, TILE] tile, the warps' sums in warp order
  const int64_t splits = gridDim.z;
  for (int e = threadIdx.x; e < TB * TILE; e += kFwdThreads) {
    const int b = e / TILE, c = e % TILE;
    const int64_t t = t0 + b, j = c0 + c;
    if (t >= n || j >= d_out) continue;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kFwdWarps; ++w) s += s_red[w][b][c];
    if (splits == 1) {
      y[t * d_out + j] = from_float<xt>(s);
    } else {
      partials[(static_cast<int64_t>(blockIdx.z) * n + t) * d_out + j] = s;
    }
  }
  if (splits == 1) return;
  __threadfence();  // this block's partial is visible device-wide before its arrival is counted
  __syncthreads();
  unsigned* counter = counters + static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) s_last = atomicAdd(counter, 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int e = threadIdx.x; e < TB * TILE; e += kFwdThreads) {
    const int b = e / TILE, c = e % TILE;
    const int64_t t = t0 + b, j = c0 + c;
    if (t >= n || j >= d_out) continue;
    float s = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) s += __ldcg(partials + (sp * n + t) * d_out + j);
    y[t * d_out + j] = from_float<xt>(s);
  }
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch that shares the buffer
}

// Backward, one warp per (token, table) pair; block (token, 8 tables), tokens vary fastest so the blocks resident
// together walk the same tables (their rows and the token's g stay in L2). The warp hashes the chunk, computes
// dot = <g, T[key]> over d_out (16-B loads where aligned, lanes' partial sums combined by a fixed shuffle tree) and
// writes the chunk's tau input-gradient values; with gt_atomic it adds p g to the fp32 table gradient row (relaxed
// atomics), with keys/ps it stores the pair's row key and weight for the segment pass.
constexpr int kBwdWarps = 8;

template <typename xt, typename tt, bool VECTOR>
__global__ void __launch_bounds__(kBwdWarps * 32) memory_backward_kernel(
    const xt* __restrict__ g, const xt* __restrict__ x, const tt* __restrict__ tables, xt* __restrict__ gx,
    float* __restrict__ gt_atomic, int64_t* __restrict__ keys, float* __restrict__ ps, int64_t n, int64_t K, int tau,
    int64_t buckets, int64_t d_out, float inv_t2) {
  constexpr int VEC = Vec16<tt>::kVec;
  const int lane = threadIdx.x & 31;
  const int64_t r = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kBwdWarps + (threadIdx.x >> 5);
  if (k >= K) return;  // whole warps: no block-wide barrier below
  const xt* z = x + (r * K + k) * tau;
  int64_t h = 0;
  float p = 1.f;
  for (int e = 0; e < tau; ++e) {  // every lane hashes (tau loads of the same addresses: broadcast)
    const float v = to_float(z[e]);
    if (v > 0.f) h |= int64_t{1} << e;
    p *= sigmoidf_dev(fabsf(v) * inv_t2);
  }
  const int64_t key = k * buckets + h;
  const tt* row = tables + key * d_out;
  const xt* grow = g + r * d_out;
  float* arow = gt_atomic == nullptr ? nullptr : gt_atomic + key * d_out;
  float partial = 0.f;
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d_out; c += 32 * VEC) {
    Vec16<tt> tv;
    float gv[VEC];
    if (VECTOR) {
      tv.raw = __ldg(reinterpret_cast<const uint4*>(row + c));
#pragma unroll
      for (int v = 0; v < VEC; ++v) gv[v] = to_float(grow[c + v]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const bool in = c + v < d_out;
        tv[v] = in ? row[c + v] : from_float<tt>(0.f);
        gv[v] = in ? to_float(grow[c + v]) : 0.f;
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      partial = fmaf(gv[v], to_float(tv[v]), partial);
      if (arow != nullptr && c + v < d_out) atomicAdd(arow + c + v, p * gv[v]);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) partial += __shfl_xor_sync(0xffffffffu, partial, o);
  if (lane < tau) {  // tau <= 16 (weightkit.ops.memoryformer.MAX_TAU)
    const float v = to_float(z[lane]);
    const float sgn = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
    gx[(r * K + k) * tau + lane] = from_float<xt>(partial * p * inv_t2 * sgn * sigmoidf_dev(-fabsf(v) * inv_t2));
  }
  if (lane == 0 && keys != nullptr) {
    keys[r * K + k] = key;
    ps[r * K + k] = p;
  }
}

// Deterministic table gradient (and the atomics-free one): the (token, table) pairs stably sorted by row key
// (torch.sort, token order kept within a key) and each row's run [starts[r], starts[r + 1]) (torch.searchsorted).
// A warp per row and column tile: it walks the run in order, kSegAhead entries at a time (their order indices, then
// their weights and g rows, loaded before any is added, so several loads are in flight), sums p g in fp32 and writes
// the row tile once in the tables' dtype (an empty run writes zeros: no memset, no fp32 copy). The sum of each
// element runs in sorted order whatever the grid: the bits do not depend on it.
constexpr int kSegWarps = 8;
constexpr int kSegVec = 4;  // columns per lane: a warp tile is 128 columns
constexpr int kSegAhead = 4;

template <typename gt_t, typename tt>
__global__ void __launch_bounds__(kSegWarps * 32) segment_rows_kernel(
    const int64_t* __restrict__ order, const int64_t* __restrict__ starts, const float* __restrict__ ps,
    const gt_t* __restrict__ g, tt* __restrict__ gt, int64_t rows, int64_t K, int64_t d_out) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kSegWarps + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 * kSegVec + lane;  // columns c + 32 v: coalesced
  const int64_t lo = starts[r], hi = starts[r + 1];
  float acc[kSegVec];
#pragma unroll
  for (int v = 0; v < kSegVec; ++v) acc[v] = 0.f;
  for (int64_t e = lo; e < hi; e += kSegAhead) {
    int64_t flat[kSegAhead];
    float p[kSegAhead], gv[kSegAhead][kSegVec];
#pragma unroll
    for (int a = 0; a < kSegAhead; ++a) flat[a] = e + a < hi ? order[e + a] : -1;
#pragma unroll
    for (int a = 0; a < kSegAhead; ++a) {
      p[a] = flat[a] >= 0 ? ps[flat[a]] : 0.f;
      const gt_t* grow = g + (flat[a] >= 0 ? flat[a] / K : 0) * d_out;
#pragma unroll
      for (int v = 0; v < kSegVec; ++v) {
        const int64_t j = c + 32 * v;
        gv[a][v] = flat[a] >= 0 && j < d_out ? to_float(grow[j]) : 0.f;
      }
    }
#pragma unroll
    for (int a = 0; a < kSegAhead; ++a)
#pragma unroll
      for (int v = 0; v < kSegVec; ++v) acc[v] += p[a] * gv[a][v];  // p = 0 past the run: adds +0 (a no-op)
  }
#pragma unroll
  for (int v = 0; v < kSegVec; ++v) {
    const int64_t j = c + 32 * v;
    if (j < d_out) gt[r * d_out + j] = from_float<tt>(acc[v]);
  }
}

// The segment pass's sort: a counting sort per table, the same order and run starts as a stable sort of the keys.
// A warp per table k (keys[t, k] = k buckets + h): the buckets' counts in shared memory (atomics: their order does
// not matter), their exclusive scan gives each run's start, then 32 tokens at a time each lane puts its token at
// its bucket's next free entry, the lanes of one bucket ranked by __match_any_sync (lower lanes, i.e. earlier
// tokens, first: stable) and the highest of them advancing the bucket.
constexpr int kRankWarps = 4;
constexpr int kRankMaxBuckets = 1024;
constexpr int kRankAhead = 4;  // counting pass: keys loaded per lane before their counts are added

__global__ void __launch_bounds__(kRankWarps * 32) rank_keys_kernel(const int64_t* __restrict__ keys,
                                                                     int64_t* __restrict__ order,
                                                                     int64_t* __restrict__ starts, int64_t n,
                                                                     int64_t K, int buckets) {
  __shared__ int next_free[kRankWarps][kRankMaxBuckets];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRankWarps + warp;
  if (k >= K) return;  // a whole warp: only __syncwarp below
  int* run = next_free[warp];
  for (int b = lane; b < buckets; b += 32) run[b] = 0;
  __syncwarp();
  const int64_t key0 = k * buckets;
  for (int64_t t0 = lane; t0 < n; t0 += 32 * kRankAhead) {  // kRankAhead key loads in flight, then their counts
    int64_t h[kRankAhead];
#pragma unroll
    for (int a = 0; a < kRankAhead; ++a) h[a] = t0 + 32 * a < n ? keys[(t0 + 32 * a) * K + k] - key0 : -1;
#pragma unroll
    for (int a = 0; a < kRankAhead; ++a)
      if (h[a] >= 0) atomicAdd(&run[h[a]], 1);
  }
  __syncwarp();
  int carry = 0;
  for (int b0 = 0; b0 < buckets; b0 += 32) {  // exclusive scan, 32 buckets a step
    const int b = b0 + lane;
    const int count = b < buckets ? run[b] : 0;
    int inclusive = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    if (b < buckets) {
      run[b] = carry + inclusive - count;
      starts[key0 + b] = k * n + carry + inclusive - count;
    }
    carry += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  if (k == K - 1 && lane == 0) starts[K * buckets] = n * K;
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;
  int next = lane < n ? static_cast<int>(keys[lane * K + k] - key0) : -1;
  for (int64_t t0 = 0; t0 < n; t0 += 32) {
    const int64_t t = t0 + lane;
    const int h = next;  // loaded one step ahead: the next key's load overlaps this step's ranking
    next = t + 32 < n ? static_cast<int>(keys[(t + 32) * K + k] - key0) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, h);
    const int base = h >= 0 ? run[h] : 0;
    __syncwarp();  // every lane has read its bucket before the highest lane of each advances it
    if (h >= 0) {
      order[k * n + base + __popc(peers & below)] = t * K + k;
      if (31 - __clz(peers) == lane) run[h] = base + __popc(peers);
    }
    __syncwarp();
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cuda_memory_lookup_forward(const void* x, int x_dtype, const void* tables, int tables_dtype, void* y,
                                         float* partials, unsigned* counters, int64_t n, int64_t K, int64_t buckets,
                                         int64_t d_out, int tau, double t, int64_t token_block, int64_t splits,
                                         int device, void* stream) {
  if (n == 0 || d_out == 0) return cudaSuccess;
  if ((token_block != 1 && token_block != 2 && token_block != 4) || splits < 1 || splits > kMaxGridY ||
      (n + token_block - 1) / token_block > kMaxGridX)
    return cudaErrorInvalidValue;
  const DeviceGuard guard(device);
  const int64_t chunk = (K + splits - 1) / splits;
  bool tables_ok = true, grid_ok = true;  // grid_ok apart: dispatch_float's result is assigned to tables_ok after f
  const bool x_ok = dispatch_float(x_dtype, [&](auto xtag) {
    using xt = decltype(xtag);
    tables_ok = dispatch_float(tables_dtype, [&](auto ttag) {
      using tt = decltype(ttag);
      constexpr int64_t tile = 32 * Vec16<tt>::kVec;
      const int64_t tiles = (d_out + tile - 1) / tile;
      if (tiles > kMaxGridY) {
        grid_ok = false;
        return;
      }
      const dim3 grid(static_cast<unsigned>((n + token_block - 1) / token_block), static_cast<unsigned>(tiles),
                      static_cast<unsigned>(splits));
      const bool vector = reinterpret_cast<uintptr_t>(tables) % 16 == 0 && (d_out * sizeof(tt)) % 16 == 0;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kFwdThreads, 0, static_cast<cudaStream_t>(stream)>>>(
            static_cast<const xt*>(x), static_cast<const tt*>(tables), static_cast<xt*>(y), partials, counters, n, K,
            tau, buckets, d_out, static_cast<float>(2.0 / t), chunk);
      };
      if (token_block == 1) {
        vector ? launch(memory_forward_kernel<xt, tt, 1, true>) : launch(memory_forward_kernel<xt, tt, 1, false>);
      } else if (token_block == 2) {
        vector ? launch(memory_forward_kernel<xt, tt, 2, true>) : launch(memory_forward_kernel<xt, tt, 2, false>);
      } else {
        vector ? launch(memory_forward_kernel<xt, tt, 4, true>) : launch(memory_forward_kernel<xt, tt, 4, false>);
      }
    });
  });
  return launch_status(x_ok && tables_ok && grid_ok);
}

WK_API int wk_cuda_memory_lookup_backward(const void* grad, const void* x, int x_dtype, const void* tables,
                                          int tables_dtype, void* gx, float* gt_atomic, int64_t* keys, float* ps,
                                          int64_t n, int64_t K, int64_t buckets, int64_t d_out, int tau, double t,
                                          int device, void* stream) {
  if (n == 0 || K == 0) return cudaSuccess;
  const int64_t chunks = (K + kBwdWarps - 1) / kBwdWarps;
  if (n > kMaxGridX || chunks > kMaxGridY) return cudaErrorInvalidValue;
  const DeviceGuard guard(device);
  bool tables_ok = true;
  const bool x_ok = dispatch_float(x_dtype, [&](auto xtag) {
    using xt = decltype(xtag);
    tables_ok = dispatch_float(tables_dtype, [&](auto ttag) {
      using tt = decltype(ttag);
      const bool vector = reinterpret_cast<uintptr_t>(tables) % 16 == 0 && (d_out * sizeof(tt)) % 16 == 0;
      auto launch = [&](auto kernel) {
        kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(chunks)), kBwdWarps * 32, 0,
                 static_cast<cudaStream_t>(stream)>>>(
            static_cast<const xt*>(grad), static_cast<const xt*>(x), static_cast<const tt*>(tables),
            static_cast<xt*>(gx), gt_atomic, keys, ps, n, K, tau, buckets, d_out, static_cast<float>(2.0 / t));
      };
      vector ? launch(memory_backward_kernel<xt, tt, true>) : launch(memory_backward_kernel<xt, tt, false>);
    });
  });
  return launch_status(x_ok && tables_ok);
}

WK_API int wk_cuda_memory_segment_sum(const int64_t* order, const int64_t* starts, const float* ps, const void* grad,
                                      int grad_dtype, void* gt, int gt_dtype, int64_t rows, int64_t K, int64_t d_out,
                                      int device, void* stream) {
  if (rows == 0 || d_out == 0) return cudaSuccess;
  const int64_t blocks = (rows + kSegWarps - 1) / kSegWarps, tiles = (d_out + 32 * kSegVec - 1) / (32 * kSegVec);
  if (blocks > kMaxGridX || tiles > kMaxGridY) return cudaErrorInvalidValue;
  const DeviceGuard guard(device);
  bool gt_ok = true;
  const bool g_ok = dispatch_float(grad_dtype, [&](auto gtag) {
    using gt_t = decltype(gtag);
    gt_ok = dispatch_float(gt_dtype, [&](auto ttag) {
      using tt = decltype(ttag);
      segment_rows_kernel<gt_t, tt><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles)),
                                      kSegWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
          order, starts, ps, static_cast<const gt_t*>(grad), static_cast<tt*>(gt), rows, K, d_out);
    });
  });
  return launch_status(g_ok && gt_ok);
}

WK_API int wk_cuda_memory_rank_keys(const int64_t* keys, int64_t* order, int64_t* starts, int64_t n, int64_t K,
                                    int64_t buckets, int device, void* stream) {
  if (buckets < 1 || buckets > kRankMaxBuckets || n < 0 || K < 0) return cudaErrorInvalidValue;
  if (K == 0) return cudaSuccess;
  const int64_t blocks = (K + kRankWarps - 1) / kRankWarps;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  const DeviceGuard guard(device);
  rank_keys_kernel<<<static_cast<unsigned>(blocks), kRankWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      keys, order, starts, n, K, static_cast<int>(buckets));
  return launch_status();
}
