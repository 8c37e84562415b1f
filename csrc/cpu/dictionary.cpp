// CPU kernels of the sparse-dense dictionary gather (spec: weightkit/ops/dictionary.py). Which forward layout runs
// (few tokens: z rows; many tokens: z^T) is chosen by the caller, weightkit/native.py, which also makes the
// transposed copies.
#include <algorithm>
#include <cstdint>

#include "../weightkit.h"
#include "parallel.h"

namespace weightkit {
namespace {

// Forward: tasks are (block of kRows tokens, block of kCols output columns), so one token still spreads over the
// threads, and each value/index is read once per kRows tokens (not once per token) while the block's z rows stay
// in cache. The index type stays compact (no widened copy).
constexpr int64_t kCols = 256;
constexpr int64_t kRows = 16;

template <typename index_t>
void gather_forward(const float* zp, const float* vp, const index_t* ip, float* yp, int64_t n, int64_t k, int64_t s,
                    int64_t d_out, int threads) {
  const int64_t col_blocks = (d_out + kCols - 1) / kCols, row_blocks = (n + kRows - 1) / kRows;
  parallel_for(threads, 0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = (task / col_blocks) * kRows, r1 = std::min(n, r0 + kRows);
      const int64_t j0 = (task % col_blocks) * kCols, j1 = std::min(d_out, j0 + kCols);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = j0; j < j1; ++j) yp[r * d_out + j] = 0.f;
      for (int64_t t = 0; t < s; ++t) {
        const float* vt = vp + t * d_out;
        const index_t* it = ip + t * d_out;
        for (int64_t r = r0; r < r1; ++r) {
          const float* zr = zp + r * k;
          float* yr = yp + r * d_out;
          for (int64_t j = j0; j < j1; ++j) yr[j] += vt[j] * zr[static_cast<int64_t>(it[j])];
        }
      }
    }
  });
}

// Many tokens: work on Z^T (k x n), so each term is an axpy over contiguous tokens (vectorized) instead of a gather:
// Y^T[j, :] = sum_t values[t, j] * Z^T[indices[t, j], :], terms added in the same order (t ascending) as above,
// so both paths give the same bits. Parallel over output columns; Z^T is read from cache (k x n floats).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void axpy_f32(float* __restrict__ y, float a, const float* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename index_t>
void gather_forward_transposed(const float* zt, const float* vp, const index_t* ip, float* yt, int64_t n, int64_t s,
                               int64_t d_out, int threads) {
  parallel_for(threads, 0, d_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* yj = yt + j * n;
      for (int64_t r = 0; r < n; ++r) yj[r] = 0.f;
      for (int64_t t = 0; t < s; ++t) {
        axpy_f32(yj, vp[t * d_out + j], zt + static_cast<int64_t>(ip[t * d_out + j]) * n, n);
      }
    }
  });
}

// Calls f(index_t{}) for an index dtype code; false for any other code.
template <typename F>
bool dispatch_index(int dtype, F&& f) {
  switch (dtype) {
    case WK_U8: f(uint8_t{}); return true;
    case WK_I16: f(int16_t{}); return true;
    case WK_I32: f(int32_t{}); return true;
    case WK_I64: f(int64_t{}); return true;
    default: return false;
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cpu_dict_gather_forward(const float* z, const float* values, const void* indices, int index_dtype,
                                      float* y, int64_t n, int64_t k, int64_t s, int64_t d_out, int threads) {
  const bool ok = dispatch_index(index_dtype, [&](auto tag) {
    using index_t = decltype(tag);
    gather_forward(z, values, static_cast<const index_t*>(indices), y, n, k, s, d_out, threads);
  });
  return ok ? WK_OK : WK_BAD_DTYPE;
}

WK_API int wk_cpu_dict_gather_forward_t(const float* zt, const float* values, const void* indices, int index_dtype,
                                        float* yt, int64_t n, int64_t s, int64_t d_out, int threads) {
  const bool ok = dispatch_index(index_dtype, [&](auto tag) {
    using index_t = decltype(tag);
    gather_forward_transposed(zt, values, static_cast<const index_t*>(indices), yt, n, s, d_out, threads);
  });
  return ok ? WK_OK : WK_BAD_DTYPE;
}

WK_API int wk_cpu_dict_gather_backward(const float* gp, const float* zp, const float* vp, const int64_t* ip,
                                       float* gzp, float* gvp, int64_t n, int64_t k, int64_t s, int64_t d_out,
                                       int threads) {
  parallel_for(threads, 0, n, 8, [&](int64_t begin, int64_t end) {  // each thread owns its rows of grad_z
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t t = 0; t < s; ++t) {
        for (int64_t j = 0; j < d_out; ++j) gzp[r * k + ip[t * d_out + j]] += vp[t * d_out + j] * gp[r * d_out + j];
      }
    }
  });
  // Each thread owns a range of output columns j for every t and sums over tokens in order (deterministic);
  // the inner loop runs along contiguous rows of grad, values and indices.
  parallel_for(threads, 0, d_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < n; ++r) {
      const float* gr = gp + r * d_out;
      const float* zr = zp + r * k;
      for (int64_t t = 0; t < s; ++t) {
        const int64_t* it = ip + t * d_out;
        float* gvt = gvp + t * d_out;
        for (int64_t j = begin; j < end; ++j) gvt[j] += gr[j] * zr[it[j]];
      }
    }
  });
  return WK_OK;
}
