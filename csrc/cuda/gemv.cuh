// The few-token GEMV of the quantized matmuls (int8.cu: int8 rows, int4.cu: INT4 packed along rows):
// y[t, r] = sum_k x[t, k] W[r, k] for up to kGemvMaxTokens tokens, each weight read once. Bandwidth-bound at 1-8
// tokens (at most 8 FMAs a weight: no tensor cores needed; from 9 tokens the backends dequantize and call cuBLAS).
//
// A block of kGemvWarps warps owns kGemvWarps * R rows, a warp R of them. K runs in chunks of kGemvChunk: the block
// stages the chunk of x (all T tokens, as fp32) in shared memory; then each lane reads W::kVals consecutive weights
// of a row with one 16-byte load (streamed: __ldcs, evict-first: W is read once), the R rows' loads in flight before
// any is used, decodes them in fp32 as the reference does (one scale, and zero, per vector: the group is a multiple
// of kVals) and accumulates x w in fp32; at the end the lanes' sums are combined by a fixed shuffle tree and lane 0
// writes the R x T outputs, each rounded once to x's dtype.
//
// A weight format W: kVals, a Vector (the 16-byte load and its scale, and zero), Vector load(row, col) const, and
// static decode(const Vector&, float* w) (kVals values).
#pragma once
#include <type_traits>

#include "common.cuh"

namespace weightkit {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvChunk = 1024;  // x values per token staged at a time: T x 4 KB of shared memory
constexpr int kGemvMaxTokens = 8;

template <typename W, typename xt, int T, int R>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(W weights, const xt* __restrict__ x, xt* __restrict__ y,
                                                             int64_t tokens, int64_t out_f, int64_t in_f) {
  constexpr int V = W::kVals;
  __shared__ __align__(16) float xs[T][kGemvChunk];  // read as float4
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * R;
  float acc[R][T];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  for (int64_t c0 = 0; c0 < in_f; c0 += kGemvChunk) {
    const int len = static_cast<int>(in_f - c0 < kGemvChunk ? in_f - c0 : kGemvChunk);
    for (int i = threadIdx.x; i < T * kGemvChunk; i += kGemvThreads) {
      const int t = i / kGemvChunk, k = i % kGemvChunk;
      xs[t][k] = t < tokens && k < len ? to_float(x[t * in_f + c0 + k]) : 0.f;
    }
    __syncthreads();
    for (int v = V * lane; v < len; v += 32 * V) {
      typename W::Vector vec[R];
#pragma unroll
      for (int r = 0; r < R; ++r)  // the R rows' loads first: R x 16 bytes in flight per lane
        vec[r] = row0 + r < out_f ? weights.load(row0 + r, c0 + v) : typename W::Vector{};
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float w[V];
        W::decode(vec[r], w);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          const float4* xv = reinterpret_cast<const float4*>(&xs[t][v]);
          float a = acc[r][t];
#pragma unroll
          for (int k4 = 0; k4 < V / 4; ++k4) {
            const float4 xx = xv[k4];
            a = fmaf(xx.x, w[4 * k4], a);
            a = fmaf(xx.y, w[4 * k4 + 1], a);
            a = fmaf(xx.z, w[4 * k4 + 2], a);
            a = fmaf(xx.w, w[4 * k4 + 3], a);
          }
          acc[r][t] = a;
        }
      }
    }
    __syncthreads();  // the chunk's x is read before the next one is staged
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r >= out_f) continue;
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (t < tokens) y[t * out_f + row0 + r] = from_float<xt>(acc[r][t]);
    }
  }
}

// The entry points' common part: checks tokens (1..kGemvMaxTokens) and rows_per_warp (1, 2, 4), then launches the
// instantiation for x's dtype, the token count rounded up to 1, 2, 4 or 8, and rows_per_warp.
template <typename W>
int launch_gemv(const W& weights, const void* x, int x_dtype, void* y, int64_t tokens, int64_t out_f, int64_t in_f,
                int64_t rows_per_warp, int device, void* stream) {
  if (tokens < 1 || tokens > kGemvMaxTokens || (rows_per_warp != 1 && rows_per_warp != 2 && rows_per_warp != 4))
    return cudaErrorInvalidValue;
  if (out_f == 0) return cudaSuccess;
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>((out_f + kGemvWarps * rows_per_warp - 1) / (kGemvWarps * rows_per_warp));
  const bool ok = dispatch_float(x_dtype, [&](auto tag) {
    using xt = decltype(tag);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kGemvThreads, 0, st>>>(weights, static_cast<const xt*>(x), static_cast<xt*>(y), tokens, out_f,
                                            in_f);
    };
    auto with_rows = [&](auto tokens_tag) {
      constexpr int kT = decltype(tokens_tag)::value;
      if (rows_per_warp == 1) launch(gemv_kernel<W, xt, kT, 1>);
      else if (rows_per_warp == 2) launch(gemv_kernel<W, xt, kT, 2>);
      else launch(gemv_kernel<W, xt, kT, 4>);
    };
    if (tokens == 1) with_rows(std::integral_constant<int, 1>{});
    else if (tokens == 2) with_rows(std::integral_constant<int, 2>{});
    else if (tokens <= 4) with_rows(std::integral_constant<int, 4>{});
    else with_rows(std::integral_constant<int, 8>{});
  });
  return launch_status(ok);
}

}  // namespace weightkit
