// CPU kernels of the dictionary matmul with S in the bitmask format (spec: weightkit/ops/dictionary.py).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../weightkit.h"
#include "dtypes.h"
#include "parallel.h"

// ---------------------------------------------------------------------------------------------------------------------
// S in the bitmask format (spec: weightkit/ops/dictionary.py, dict_bitmask_matmul): bitmask int32 (W x d_out),
// values (s x d_out, column j's nonzeros in ascending atom order), word_offsets (W x d_out, u8/i16/i32: column j's set
// bits before word w). A column's r-th nonzero is values[r, j]; the bit t of word w gives atom 32 w + t and value
// index word_offsets[w, j] + popcount(the bits of word w below t), which the loops below advance one set bit at a
// time (clear the lowest set bit, count trailing zeros for the atom), so only the used atoms are visited.
//
// Which kernel runs is chosen by the caller (weightkit/backends/cpu/dictionary.py): the direct kernels below for few tokens; for many,
// S^T is decoded to a dense fp32 matrix for torch's BLAS, and grad_values gathered from the dense grad S^T.

namespace weightkit {
namespace {

// The direct kernels work on blocks of columns: a block's atoms are first decoded into an ELL-like scratch array
// (idx[r][c] = the atom of the r-th nonzero of the block's column c), so that the arithmetic runs along contiguous
// rows of values (values[r, j0 .. j1)) with independent accumulators per column: it vectorizes (a gather of z per
// row of idx) instead of forming one long dependent chain per column. Each output sums its column's terms in
// ascending atom order.
constexpr int64_t kBmRows = 8;     // forward: tokens per accumulator block
constexpr int64_t kBmCols = 32;    // forward and the dense decode / gather: columns per task
constexpr int64_t kBmGzCols = 128; // backward: columns per task, and per fp32 partial of grad_z

// Calls f(offset_t{}) for a word_offsets dtype code; false for any other code.
template <typename F>
bool dispatch_offset(int dtype, F&& f) {
  switch (dtype) {
    case WK_U8: f(uint8_t{}); return true;
    case WK_I16: f(int16_t{}); return true;
    case WK_I32: f(int32_t{}); return true;
    default: return false;
  }
}

// Calls f(value_t{}, offset_t{}) for the dtype codes of values and word_offsets.
template <typename F>
bool dispatch_values_offsets(int value_dtype, int offset_dtype, F&& f) {
  bool inner = false;
  const bool outer = dispatch_float(value_dtype, [&](auto vtag) {
    inner = dispatch_offset(offset_dtype, [&](auto otag) { f(vtag, otag); });
  });
  return outer && inner;
}

// Visits the set bits of column j in ascending atom order: g(atom, value index). The value index is the count of set
// bits before it, which the format's word offsets must equal at every word. Returns false, having called g only with
// atoms < k and value indices < s, on a malformed column (an offset that is not the running count, a bit of an atom
// >= k, not exactly s bits): the codes are validated in full only under debug checks, so the kernels check what they
// read instead of trusting it with their memory accesses (a compare per word and per bit).
template <typename offset_t, typename G>
inline bool for_each_atom(const int32_t* bm, const offset_t* off, int64_t k, int64_t s, int64_t d_out, int64_t j,
                          G&& g) {
  const int64_t words = (k + 31) / 32;
  int64_t r = 0;
  for (int64_t w = 0; w < words; ++w) {
    if (static_cast<int64_t>(off[w * d_out + j]) != r) return false;
    for (uint32_t bits = static_cast<uint32_t>(bm[w * d_out + j]); bits; bits &= bits - 1) {
      const int64_t a = w * 32 + __builtin_ctz(bits);
      if (a >= k || r >= s) return false;
      g(a, r++);
    }
  }
  return r == s;
}

// idx[r * stride + c] = the atom of value r of column j0 + c, for c < cols; false on malformed codes.
template <typename offset_t>
inline bool decode_block(const int32_t* bm, const offset_t* off, int64_t k, int64_t s, int64_t d_out, int64_t j0,
                         int64_t cols, int32_t* idx, int64_t stride) {
  for (int64_t c = 0; c < cols; ++c) {
    const bool ok = for_each_atom(bm, off, k, s, d_out, j0 + c,
                                  [&](int64_t a, int64_t r) { idx[r * stride + c] = static_cast<int32_t>(a); });
    if (!ok) return false;
  }
  return true;
}

// The loop every bitmask kernel runs: the columns [c0, c1) in blocks of `block`, blocks spread over the threads; each
// task gets its own scratch, `idx` (s x block) and `work` (`work_floats` fp32 values for the body's own use), and
// body(b, j0, cols, idx, work) runs for block b (columns j0 .. j0 + cols) once its atoms are decoded into idx
// (stride `block`). Returns a wk_status: WK_NO_MEMORY if a task's scratch could not be allocated, WK_BAD_CODES on
// malformed codes (the task stops at that block).
template <typename offset_t, typename Body>
int for_each_column_block(const int32_t* bm, const offset_t* off, int64_t k, int64_t s, int64_t d_out, int64_t c0,
                          int64_t c1, int64_t block, int64_t work_floats, int threads, Body&& body) {
  const int64_t blocks = (c1 - c0 + block - 1) / block;
  std::atomic<int> status{WK_OK};
  parallel_for(threads, 0, blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<int32_t> idx(s * block);
    Scratch<float> work(work_floats);
    if (!idx.ok() || !work.ok()) {
      status = WK_NO_MEMORY;
      return;
    }
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = c0 + b * block, cols = std::min(block, c1 - j0);
      if (!decode_block(bm, off, k, s, d_out, j0, cols, idx.data(), block)) {
        status = WK_BAD_CODES;
        return;
      }
      body(b, j0, cols, static_cast<const int32_t*>(idx.data()), work.data());
    }
  });
  return status;
}

// y (n x d_out, z's dtype) = z (n x k) S, fp32 accumulation. Tasks: blocks of kBmCols columns (decoded once, then
// kBmRows tokens at a time). Return a wk_status.
template <typename z_t, typename value_t, typename offset_t>
int bitmask_forward(const z_t* zp, const value_t* vp, const int32_t* bm, const offset_t* off, z_t* yp, int64_t n,
                    int64_t k, int64_t s, int64_t d_out, int threads) {
  return for_each_column_block(bm, off, k, s, d_out, 0, d_out, kBmCols, 0, threads,
                               [&](int64_t, int64_t j0, int64_t cols, const int32_t* idx, float*) {
    for (int64_t r0 = 0; r0 < n; r0 += kBmRows) {
      const int64_t rows = std::min(kBmRows, n - r0);
      float acc[kBmRows][kBmCols] = {};
      for (int64_t r = 0; r < s; ++r) {
        const value_t* vr = vp + r * d_out + j0;
        const int32_t* ir = idx + r * kBmCols;
        for (int64_t m = 0; m < rows; ++m) {
          const z_t* zm = zp + (r0 + m) * k;
          float* am = acc[m];
          for (int64_t c = 0; c < cols; ++c) am[c] += static_cast<float>(vr[c]) * static_cast<float>(zm[ir[c]]);
        }
      }
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t c = 0; c < cols; ++c) yp[(r0 + m) * d_out + j0 + c] = from_float<z_t>(acc[m][c]);
    }
  });
}

// grad_z = grad S^T (n x k) and grad_values[r, j] = <z[:, a_r], grad[:, j]>. Tasks: blocks of kBmGzCols columns.
// grad_values: each entry summed over the tokens in order by the task owning its column. grad_z sums over the
// columns: each block adds its terms into its own fp32 partial (n x k), and the partials are added block by block in
// ascending order, so the result depends neither on the threads nor on their timing.
template <typename z_t, typename value_t, typename offset_t>
int bitmask_backward(const z_t* gp, const z_t* zp, const value_t* vp, const int32_t* bm, const offset_t* off,
                     z_t* gzp, value_t* gvp, float* partials, int64_t n, int64_t k, int64_t s, int64_t d_out,
                     int threads) {
  const int64_t blocks = (d_out + kBmGzCols - 1) / kBmGzCols;
  // work per task: gv (s x kBmGzCols, the block's grad_values in fp32), then g (kBmGzCols, one token's grad)
  const int status = for_each_column_block(
      bm, off, k, s, d_out, 0, d_out, kBmGzCols, (s + 1) * kBmGzCols, threads,
      [&](int64_t b, int64_t j0, int64_t cols, const int32_t* idx, float* work) {
        float* gv = work;
        float* g = work + s * kBmGzCols;
        float* part = partials + b * n * k;
        for (int64_t i = 0; i < n * k; ++i) part[i] = 0.f;
        for (int64_t i = 0; i < s * kBmGzCols; ++i) gv[i] = 0.f;
        for (int64_t m = 0; m < n; ++m) {
          const z_t* zm = zp + m * k;
          float* pm = part + m * k;
          for (int64_t c = 0; c < cols; ++c) g[c] = static_cast<float>(gp[m * d_out + j0 + c]);
          for (int64_t r = 0; r < s; ++r) {
            const value_t* vr = vp + r * d_out + j0;
            const int32_t* ir = idx + r * kBmGzCols;
            float* gvr = gv + r * kBmGzCols;
            for (int64_t c = 0; c < cols; ++c) gvr[c] += static_cast<float>(zm[ir[c]]) * g[c];
            for (int64_t c = 0; c < cols; ++c) pm[ir[c]] += static_cast<float>(vr[c]) * g[c];
          }
        }
        for (int64_t r = 0; r < s; ++r)
          for (int64_t c = 0; c < cols; ++c) gvp[r * d_out + j0 + c] = from_float<value_t>(gv[r * kBmGzCols + c]);
      });
  if (status != WK_OK) return status;
  parallel_for(threads, 0, n * k, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float acc = partials[i];
      for (int64_t b = 1; b < blocks; ++b) acc += partials[b * n * k + i];
      gzp[i] = from_float<z_t>(acc);
    }
  });
  return WK_OK;
}

// Columns [c0, c1) of S as the rows of a dense fp32 matrix dense_t ((c1 - c0) x k, i.e. those columns of S^T), and the
// inverse on a dense matrix: out[r, j] (s x d_out; columns [c0, c1) written) = dense_t[j - c0, a_r] (grad S^T =
// grad^T z gathered into grad_values). The transposed layout makes a column of S one contiguous row (S row-major
// would put a column's nonzeros on up to s different pages), and BLAS takes the transposed view without a copy. Tasks: blocks of kBmCols columns decoded into idx, then values read
// along their rows. Return a wk_status.
template <typename value_t, typename offset_t>
int bitmask_to_dense_t(const value_t* vp, const int32_t* bm, const offset_t* off, float* dense_t, int64_t k,
                       int64_t s, int64_t d_out, int64_t c0, int64_t c1, int threads) {
  return for_each_column_block(bm, off, k, s, d_out, c0, c1, kBmCols, 0, threads,
                               [&](int64_t, int64_t j0, int64_t cols, const int32_t* idx, float*) {
    float* dj = dense_t + (j0 - c0) * k;  // row j - c0 of dense_t is column j of S
    for (int64_t i = 0; i < cols * k; ++i) dj[i] = 0.f;
    for (int64_t r = 0; r < s; ++r) {
      const value_t* vr = vp + r * d_out + j0;
      const int32_t* ir = idx + r * kBmCols;
      for (int64_t c = 0; c < cols; ++c) dj[c * k + ir[c]] = static_cast<float>(vr[c]);
    }
  });
}

template <typename value_t, typename offset_t>
int bitmask_gather_dense_t(const float* dense_t, const int32_t* bm, const offset_t* off, value_t* out, int64_t k,
                           int64_t s, int64_t d_out, int64_t c0, int64_t c1, int threads) {
  return for_each_column_block(bm, off, k, s, d_out, c0, c1, kBmCols, 0, threads,
                               [&](int64_t, int64_t j0, int64_t cols, const int32_t* idx, float*) {
    const float* dj = dense_t + (j0 - c0) * k;
    for (int64_t r = 0; r < s; ++r) {
      value_t* outr = out + r * d_out + j0;
      const int32_t* ir = idx + r * kBmCols;
      for (int64_t c = 0; c < cols; ++c) outr[c] = from_float<value_t>(dj[c * k + ir[c]]);
    }
  });
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cpu_dict_bitmask_forward(const void* z, int z_dtype, const void* values, int value_dtype,
                                       const int32_t* bitmask, const void* word_offsets, int offset_dtype, void* y,
                                       int64_t n, int64_t k, int64_t s, int64_t d_out, int threads) {
  bool ok = false;
  int status = WK_OK;
  dispatch_float(z_dtype, [&](auto ztag) {
    using z_t = decltype(ztag);
    ok = dispatch_values_offsets(value_dtype, offset_dtype, [&](auto vtag, auto otag) {
      using value_t = decltype(vtag);
      using offset_t = decltype(otag);
      status = bitmask_forward(static_cast<const z_t*>(z), static_cast<const value_t*>(values), bitmask,
                               static_cast<const offset_t*>(word_offsets), static_cast<z_t*>(y), n, k, s, d_out,
                               threads);
    });
  });
  return ok ? status : WK_BAD_DTYPE;
}

WK_API int wk_cpu_dict_bitmask_backward(const void* grad, const void* z, int z_dtype, const void* values,
                                        int value_dtype, const int32_t* bitmask, const void* word_offsets,
                                        int offset_dtype, void* grad_z, void* grad_values, int64_t n, int64_t k,
                                        int64_t s, int64_t d_out, int threads) {
  Scratch<float> partials(((d_out + kBmGzCols - 1) / kBmGzCols) * n * k);
  if (!partials.ok()) return WK_NO_MEMORY;
  bool ok = false;
  int status = WK_OK;
  dispatch_float(z_dtype, [&](auto ztag) {
    using z_t = decltype(ztag);
    ok = dispatch_values_offsets(value_dtype, offset_dtype, [&](auto vtag, auto otag) {
      using value_t = decltype(vtag);
      using offset_t = decltype(otag);
      status = bitmask_backward(static_cast<const z_t*>(grad), static_cast<const z_t*>(z),
                                static_cast<const value_t*>(values), bitmask,
                                static_cast<const offset_t*>(word_offsets), static_cast<z_t*>(grad_z),
                                static_cast<value_t*>(grad_values), partials.data(), n, k, s, d_out, threads);
    });
  });
  return ok ? status : WK_BAD_DTYPE;
}

WK_API int wk_cpu_dict_bitmask_to_dense_t(const void* values, int value_dtype, const int32_t* bitmask,
                                          const void* word_offsets, int offset_dtype, float* dense_t, int64_t k,
                                          int64_t s, int64_t d_out, int64_t c0, int64_t c1, int threads) {
  int status = WK_OK;
  const bool ok = dispatch_values_offsets(value_dtype, offset_dtype, [&](auto vtag, auto otag) {
    using value_t = decltype(vtag);
    using offset_t = decltype(otag);
    status = bitmask_to_dense_t(static_cast<const value_t*>(values), bitmask,
                                static_cast<const offset_t*>(word_offsets), dense_t, k, s, d_out, c0, c1, threads);
  });
  return ok ? status : WK_BAD_DTYPE;
}

WK_API int wk_cpu_dict_bitmask_gather_dense_t(const float* dense_t, const int32_t* bitmask, const void* word_offsets,
                                              int offset_dtype, void* out, int out_dtype, int64_t k, int64_t s,
                                              int64_t d_out, int64_t c0, int64_t c1, int threads) {
  int status = WK_OK;
  const bool ok = dispatch_values_offsets(out_dtype, offset_dtype, [&](auto vtag, auto otag) {
    using value_t = decltype(vtag);
    using offset_t = decltype(otag);
    status = bitmask_gather_dense_t(dense_t, bitmask, static_cast<const offset_t*>(word_offsets),
                                    static_cast<value_t*>(out), k, s, d_out, c0, c1, threads);
  });
  return ok ? status : WK_BAD_DTYPE;
}
