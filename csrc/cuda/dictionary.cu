// CUDA kernels of the dictionary matmul with S in the bitmask format (spec: weightkit/ops/dictionary.py,
// dict_bitmask_matmul), for its "decode S to dense + cuBLAS" backend (weightkit/backends/cuda/dictionary.py): the
// GEMMs are torch's (cuBLAS); these kernels convert between the bitmask format and a dense S^T.
//
// * to_dense_t: dense_t (d_out x k, the activation's dtype) = S^T. A block owns kTileCols columns of S (rows of S^T)
//   and stages their values through shared memory: values is (s, d_out) row-major, so one column's nonzeros are
//   d_out apart and a warp reading them directly would touch a sector per lane; instead the block copies the rows
//   [r0, r0 + chunk) x its kTileCols columns into shared memory with coalesced loads (one 32-byte sector of bf16 per
//   row), then each warp decodes one mask word of one column at a time: lane b is atom 32 w + b, its rank in values
//   is word_offsets[w] + __popc(word & lanemask_lt) (the warp-level popcount prefix: no scan), and the warp writes 32
//   consecutive elements of S^T's row (coalesced), the value from shared memory where the bit is set, else 0.
// * gather_dense_t, the reverse for the backward: out (s x d_out, values' order) = dense_t at the set bits. Each
//   warp reads a word's 32 consecutive elements of a row of dense_t and puts the set ones at their ranks in shared
//   memory; the block then stores the staged rows of out with coalesced stores. Every entry of out is written once
//   (no atomics: deterministic).
// Columns with more than kChunkRows nonzeros take several passes over the words (each pass stages one chunk of
// ranks); each element is still written exactly once. Shared memory rows are padded to an odd number of 32-bit
// words, so the lanes of a warp (consecutive ranks, one column) hit distinct banks.
// Malformed codes (not checked up front without debug checks) cannot make these kernels read or write out of
// bounds: ranks outside [0, s) are skipped (the output is then wrong, not the memory).
#include "common.cuh"

namespace weightkit {
namespace {

constexpr int kTileCols = 16;             // columns of S per block
constexpr int kWarps = 8;                 // warps per block
constexpr int kStageBytes = 32 * 1024;    // shared memory staging per block (~32 KB: several blocks per SM)

template <typename V>
struct Stage {
  static constexpr int kPad = 4 / static_cast<int>(sizeof(V));  // row stride: kTileCols + pad = an odd word count
  static constexpr int kStride = kTileCols + kPad;
  static constexpr int kRows = kStageBytes / (kStride * static_cast<int>(sizeof(V)));
};

// The lanes below this one (what PTX's %lanemask_lt reads; computed once per thread, so no inline PTX).
__device__ __forceinline__ unsigned lanemask_lt() { return (1u << (threadIdx.x & 31)) - 1u; }

// Calls f(O{}) with O the storage type of a word_offsets dtype code; false for any other code.
template <typename F>
bool dispatch_offsets(int dtype, F&& f) {
  switch (dtype) {
    case WK_U8: f(uint8_t{}); return true;
    case WK_I16: f(int16_t{}); return true;
    case WK_I32: f(int32_t{}); return true;
    default: return false;
  }
}

// GATHER false: dense_t = S^T (values -> dense). GATHER true: out = dense_t at the set bits (dense -> values' order).
// V: the values' (resp. out's) type, D: dense_t's type, O: word_offsets' type.
template <bool GATHER, typename V, typename D, typename O>
__global__ void __launch_bounds__(kWarps * 32)
bitmask_dense_t_kernel(V* __restrict__ vals, D* __restrict__ dense_t, const int32_t* __restrict__ bitmask,
                       const O* __restrict__ offsets, int64_t k, int64_t s, int64_t d_out, int64_t words) {
  using St = Stage<V>;
  __shared__ V stage[St::kRows * St::kStride];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int cols = static_cast<int>(d_out - n0 < kTileCols ? d_out - n0 : kTileCols);
  const unsigned below = lanemask_lt();
  const int64_t passes = s > 0 ? (s + St::kRows - 1) / St::kRows : 1;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t r0 = pass * St::kRows;
    const int rows = static_cast<int>(s - r0 < St::kRows ? s - r0 : St::kRows);
    if (!GATHER) {  // stage values[r0 .. r0 + rows) x [n0, n0 + cols): consecutive threads, consecutive columns
      for (int i = threadIdx.x; i < rows * kTileCols; i += blockDim.x) {
        const int r = i / kTileCols, c = i % kTileCols;
        if (c < cols) stage[r * St::kStride + c] = vals[(r0 + r) * d_out + n0 + c];
      }
      __syncthreads();
    }
    // warp tasks (column c, word w), w fastest: neighbouring tasks write neighbouring parts of a row of dense_t. A
    // warp takes 32 tasks at a time: lane j loads task j's mask word and offset (one round trip for 32 tasks), then
    // the warp runs the 32 tasks, each broadcast from its lane by a shuffle.
    const int64_t tasks = static_cast<int64_t>(cols) * words;
    for (int64_t t0 = 32 * warp; t0 < tasks; t0 += 32 * kWarps) {
      unsigned my_word = 0;
      int my_base = 0;
      if (t0 + lane < tasks) {
        const int64_t at = ((t0 + lane) % words) * d_out + n0 + (t0 + lane) / words;
        my_word = static_cast<unsigned>(bitmask[at]);
        my_base = static_cast<int>(offsets[at]);
      }
      const int todo = static_cast<int>(tasks - t0 < 32 ? tasks - t0 : 32);
      for (int j = 0; j < todo; ++j) {
        const unsigned word = __shfl_sync(0xffffffffu, my_word, j);
        const int64_t base = __shfl_sync(0xffffffffu, my_base, j);
        const int64_t task = t0 + j;
        const int c = static_cast<int>(task / words);
        const int64_t w = task % words;
        const int64_t count = __popc(word);
        if (!(pass == 0 && !GATHER) && (count == 0 || base + count <= r0 || base >= r0 + rows)) continue;
        const int64_t atom = 32 * w + lane;
        if (atom >= k) continue;
        const bool bit = (word >> lane) & 1u;
        const int64_t rank = base + __popc(word & below);
        const bool staged = bit && rank >= r0 && rank < r0 + rows;
        D* elem = dense_t + (n0 + c) * k + atom;
        if (GATHER) {
          if (staged) stage[(rank - r0) * St::kStride + c] = from_float<V>(to_float(*elem));
        } else if (staged) {
          *elem = from_float<D>(to_float(stage[(rank - r0) * St::kStride + c]));
        } else if (pass == 0 && !bit) {
          *elem = from_float<D>(0.f);
        }
      }
    }
    __syncthreads();
    if (GATHER) {  // store the staged rows of out, coalesced; then the stage is free for the next pass
      for (int i = threadIdx.x; i < rows * kTileCols; i += blockDim.x) {
        const int r = i / kTileCols, c = i % kTileCols;
        if (c < cols) vals[(r0 + r) * d_out + n0 + c] = stage[r * St::kStride + c];
      }
      __syncthreads();
    }
  }
}

template <bool GATHER>
int launch(void* vals, int value_dtype, void* dense_t, int dense_dtype, const int32_t* bitmask,
           const void* offsets, int offset_dtype, int64_t k, int64_t s, int64_t d_out, int device, void* stream) {
  DeviceGuard guard(device);
  if (d_out <= 0 || k <= 0) return launch_status();
  const int64_t words = (k + 31) / 32;
  const unsigned blocks = static_cast<unsigned>((d_out + kTileCols - 1) / kTileCols);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  bool dense_ok = false, offsets_ok = false;
  const bool values_ok = dispatch_float(value_dtype, [&](auto v) {
    using V = decltype(v);
    dense_ok = dispatch_float(dense_dtype, [&](auto d) {
      using D = decltype(d);
      offsets_ok = dispatch_offsets(offset_dtype, [&](auto o) {
        using O = decltype(o);
        bitmask_dense_t_kernel<GATHER, V, D, O><<<blocks, kWarps * 32, 0, st>>>(
            static_cast<V*>(vals), static_cast<D*>(dense_t), bitmask, static_cast<const O*>(offsets), k, s, d_out,
            words);
      });
    });
  });
  return launch_status(values_ok && dense_ok && offsets_ok);
}

}  // namespace
}  // namespace weightkit

WK_API int wk_cuda_dict_bitmask_to_dense_t(const void* values, int value_dtype, const int32_t* bitmask,
                                           const void* word_offsets, int offset_dtype, void* dense_t, int dense_dtype,
                                           int64_t k, int64_t s, int64_t d_out, int device, void* stream) {
  return weightkit::launch<false>(const_cast<void*>(values), value_dtype, dense_t, dense_dtype, bitmask, word_offsets,
                                  offset_dtype, k, s, d_out, device, stream);
}

WK_API int wk_cuda_dict_bitmask_gather_dense_t(const void* dense_t, int dense_dtype, const int32_t* bitmask,
                                               const void* word_offsets, int offset_dtype, void* out, int out_dtype,
                                               int64_t k, int64_t s, int64_t d_out, int device, void* stream) {
  return weightkit::launch<true>(out, out_dtype, const_cast<void*>(dense_t), dense_dtype, bitmask, word_offsets,
                                 offset_dtype, k, s, d_out, device, stream);
}
