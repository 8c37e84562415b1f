// CPU kernels of the MemoryFormer lookup (spec: weightkit/ops/memoryformer.py).
#include <algorithm>
#include <cmath>

#include "../weightkit.h"
#include "dtypes.h"
#include "parallel.h"

namespace weightkit {
namespace {

inline float sigmoidf(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// Bucket and weight of chunk z[0..tau): bit i = (z_i > 0), p = prod sigmoid(2|z_i|/t).
template <typename T>
inline void hash_chunk(const T* z, int tau, float inv_t2, int64_t* h, float* p) {
  int64_t bucket = 0;
  float w = 1.0f;
  for (int i = 0; i < tau; ++i) {
    const float v = static_cast<float>(z[i]);
    if (v > 0.f) bucket |= int64_t{1} << i;
    w *= sigmoidf(std::fabs(v) * inv_t2);
  }
  *h = bucket;
  *p = w;
}

// Hash every chunk once (n x K buckets and weights), then split the sums over (token, column block) tasks, so that a
// single token still uses every thread. Per output element the K rows are added in order k = 0, 1, ..., whatever
// the split: the result does not depend on the thread count.
template <typename xt, typename tt>
int lookup_forward(const xt* xp, const tt* tp, xt* yp, int64_t n, int64_t K, int64_t buckets, int64_t d_out, int tau,
                   float inv_t2, int threads) {
  Scratch<int64_t> hs(n * K);
  Scratch<float> ps(n * K);
  if (!hs.ok() || !ps.ok()) return WK_NO_MEMORY;
  parallel_for(threads, 0, n * K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) hash_chunk(xp + i * tau, tau, inv_t2, &hs[i], &ps[i]);
  });
  constexpr int64_t kCols = 256;
  const int64_t col_blocks = (d_out + kCols - 1) / kCols;
  parallel_for(threads, 0, n * col_blocks, 1, [&](int64_t begin, int64_t end) {
    float acc[kCols];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / col_blocks, j0 = (task % col_blocks) * kCols, len = std::min(kCols, d_out - j0);
      std::fill(acc, acc + len, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float p = ps[r * K + k];
        const tt* row = tp + (k * buckets + hs[r * K + k]) * d_out + j0;
        for (int64_t j = 0; j < len; ++j) acc[j] += p * static_cast<float>(row[j]);
      }
      for (int64_t j = 0; j < len; ++j) yp[r * d_out + j0 + j] = from_float<xt>(acc[j]);
    }
  });
  return WK_OK;
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cpu_memory_lookup_forward(const void* x, int x_dtype, const void* tables, int tables_dtype, void* y,
                                        int64_t n, int64_t K, int64_t buckets, int64_t d_out, int tau, double t,
                                        int threads) {
  const float inv_t2 = static_cast<float>(2.0 / t);
  int status = WK_BAD_DTYPE;
  dispatch_float(x_dtype, [&](auto xtag) {
    using xt = decltype(xtag);
    dispatch_float(tables_dtype, [&](auto ttag) {
      using tt = decltype(ttag);
      status = lookup_forward(static_cast<const xt*>(x), static_cast<const tt*>(tables), static_cast<xt*>(y), n, K, buckets,
                     d_out, tau, inv_t2, threads);
    });
  });
  return status;
}

// grad_x: one pass over tokens. grad_tables: one thread per table, tokens in order, so the sums are always
// deterministic (no atomics on CPU).
WK_API int wk_cpu_memory_lookup_backward(const float* gp, const float* xp, const float* tp, float* gxp, float* gtp,
                                         int64_t n, int64_t K, int64_t buckets, int64_t d_out, int tau, double t,
                                         int threads) {
  const float inv_t2 = static_cast<float>(2.0 / t);
  Scratch<int64_t> hs(n * K);
  Scratch<float> ps(n * K);
  if (!hs.ok() || !ps.ok()) return WK_NO_MEMORY;
  int64_t* hp = hs.data();
  float* pp = ps.data();
  parallel_for(threads, 0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const float* z = xp + r * K * tau + k * tau;
        int64_t h;
        float p;
        hash_chunk(z, tau, inv_t2, &h, &p);
        hp[r * K + k] = h;
        pp[r * K + k] = p;
        const float* row = tp + (k * buckets + h) * d_out;
        float dot = 0.f;
        for (int64_t j = 0; j < d_out; ++j) dot += gp[r * d_out + j] * row[j];
        for (int i = 0; i < tau; ++i) {
          const float v = z[i];
          const float sgn = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
          gxp[r * K * tau + k * tau + i] = dot * p * inv_t2 * sgn * sigmoidf(-std::fabs(v) * inv_t2);
        }
      }
    }
  });
  parallel_for(threads, 0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = 0; r < n; ++r) {
        const float p = pp[r * K + k];
        float* row = gtp + (k * buckets + hp[r * K + k]) * d_out;
        for (int64_t j = 0; j < d_out; ++j) row[j] += p * gp[r * d_out + j];
      }
    }
  });
  return WK_OK;
}
