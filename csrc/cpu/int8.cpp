// CPU kernels for INT8 stochastic rounding and the int8 matmul (spec: weightkit/ops/int8.py). The matmul's BLAS
// part (many tokens: a block of dequantized rows at a time times x) is done by torch in weightkit/backends/cpu.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../philox.h"
#include "../weightkit.h"
#include "dtypes.h"
#include "parallel.h"

namespace weightkit {
namespace {

template <typename scalar_t>
void stochastic_round(const scalar_t* xp, const float* s, int8_t* q, int64_t n, int64_t group_size, uint64_t seed,
                      uint64_t offset, int threads) {
  const uint64_t first = offset, last = first + static_cast<uint64_t>(n);
  // One Philox call feeds four consecutive stream positions.
  const int64_t block_begin = static_cast<int64_t>(first >> 2), block_end = static_cast<int64_t>((last + 3) >> 2);
  // captured by value: the int8 stores may alias anything, which would make the compiler reload captured references
  parallel_for(threads, block_begin, block_end, 4096, [=](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Philox4 r = philox4x32_10(static_cast<uint64_t>(b), seed);
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t g = static_cast<uint64_t>(b) * 4 + lane;
        if (g < first || g >= last) continue;
        const int64_t i = static_cast<int64_t>(g - first);
        const float inv = 1.0f / s[i / group_size];
        const float scaled = static_cast<float>(xp[i]) * inv;  // built with -ffp-contract=off: no fma
        float v = std::floor(scaled + bits_to_uniform(r.v[lane]));
        v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
        q[i] = static_cast<int8_t>(v);
      }
    }
  });
}

// Fused weight update of Q-GaLore (spec: int8_sr_update_ in weightkit/ops/int8.py), one group at a time:
//   w = (q * s + delta) * decay;  s' = max(max|w| / 127, FLT_MIN);  q' = clamp(floor(w * (1 / s') + u), -128, 127)
// with u from the Philox stream at position offset + i, exactly as stochastic_round_int8 on w with scale s'.
template <typename scalar_t>
void sr_update_groups(int8_t* q, float* scale, const scalar_t* delta, int64_t g0, int64_t g1, int64_t gs,
                      float decay, uint64_t seed, uint64_t offset) {
  for (int64_t g = g0; g < g1; ++g) {
    int8_t* qg = q + g * gs;
    const scalar_t* dg = delta + g * gs;
    const float s = scale[g];
    float amax = 0.0f;
    for (int64_t i = 0; i < gs; ++i) {
      const float w = (static_cast<float>(qg[i]) * s + static_cast<float>(dg[i])) * decay;
      amax = std::max(amax, std::fabs(w));
    }
    float ns = amax / 127.0f;
    if (ns < std::numeric_limits<float>::min()) ns = std::numeric_limits<float>::min();
    const float inv = 1.0f / ns;
    uint64_t cached = ~uint64_t{0};
    Philox4 r{};
    for (int64_t i = 0; i < gs; ++i) {
      const float w = (static_cast<float>(qg[i]) * s + static_cast<float>(dg[i])) * decay;
      const uint64_t pos = offset + static_cast<uint64_t>(g * gs + i);
      if ((pos >> 2) != cached) {
        cached = pos >> 2;
        r = philox4x32_10(cached, seed);
      }
      float v = std::floor(w * inv + bits_to_uniform(r.v[pos & 3]));
      v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
      qg[i] = static_cast<int8_t>(v);
    }
    scale[g] = ns;
  }
}

// Dot product of n floats with n int8 values, 16 independent partial sums (vectorizes without reassociation flags).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
float dot_f32_i8(const float* x, const int8_t* q, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] += x[i + l] * static_cast<float>(q[i + l]);
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * static_cast<float>(q[i]);
  float total = tail;
  for (int l = 0; l < 16; ++l) total += acc[l];
  return total;
}

// y[j] += c * q[j] for n values.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void axpy_i8(float* y, float c, const int8_t* q, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += c * static_cast<float>(q[j]);
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cpu_stochastic_round_int8(const void* x, int x_dtype, const float* scale, int8_t* out, int64_t n,
                                        int64_t group_size, uint64_t seed, uint64_t offset, int threads) {
  const bool ok = dispatch_float(x_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    stochastic_round(static_cast<const scalar_t*>(x), scale, out, n, group_size, seed, offset, threads);
  });
  return ok ? WK_OK : WK_BAD_DTYPE;
}

WK_API int wk_cpu_int8_sr_update(int8_t* q, float* scale, const void* delta, int delta_dtype, int64_t groups,
                                 int64_t group_size, float decay, uint64_t seed, uint64_t offset,
                                 const float* found_inf, int threads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return WK_OK;  // a skipped step: nothing written
  const bool ok = dispatch_float(delta_dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* d = static_cast<const scalar_t*>(delta);
    parallel_for(threads, 0, groups, std::max<int64_t>(1, 8192 / group_size), [&](int64_t a, int64_t b) {
      sr_update_groups<scalar_t>(q, scale, d, a, b, group_size, decay, seed, offset);
    });
  });
  return ok ? WK_OK : WK_BAD_DTYPE;
}

// Few-token path: read the int8 weight once, never dequantize it into memory.
//   transpose=false: y[t, o] = sum_g s[o, g] * dot(x[t, group g], q[o, group g])   (parallel over rows o)
//   transpose=true:  y[t, :] += (x[t, o] * s[o, g]) * q[o, group g]               (parallel over column groups)
WK_API int wk_cpu_int8_matvec(const float* x, const int8_t* q, const float* s, float* y, int64_t tokens, int64_t out_f,
                              int64_t in_f, int64_t group, int transpose, int threads) {
  const int64_t per_row = in_f / group;
  if (!transpose) {
    parallel_for(threads, 0, out_f, 16, [&](int64_t a, int64_t b) {
      for (int64_t o = a; o < b; ++o) {
        for (int64_t t = 0; t < tokens; ++t) {
          float acc = 0.0f;
          for (int64_t g = 0; g < per_row; ++g) {
            acc += s[o * per_row + g] * dot_f32_i8(x + t * in_f + g * group, q + o * in_f + g * group, group);
          }
          y[t * out_f + o] = acc;
        }
      }
    });
    return WK_OK;
  }
  parallel_for(threads, 0, per_row, std::max<int64_t>(1, 512 / group), [&](int64_t a, int64_t b) {
    for (int64_t t = 0; t < tokens; ++t) std::memset(y + t * in_f + a * group, 0, sizeof(float) * (b - a) * group);
    for (int64_t o = 0; o < out_f; ++o) {
      for (int64_t t = 0; t < tokens; ++t) {
        const float xo = x[t * out_f + o];
        for (int64_t g = a; g < b; ++g) {
          axpy_i8(y + t * in_f + g * group, xo * s[o * per_row + g], q + o * in_f + g * group, group);
        }
      }
    }
  });
  return WK_OK;
}

WK_API int wk_cpu_int8_dequantize_rows(const int8_t* q, const float* s, float* buf, int64_t r0, int64_t r1,
                                       int64_t in_f, int64_t group, int threads) {
  const int64_t per_row = in_f / group;
  parallel_for(threads, r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      for (int64_t g = 0; g < per_row; ++g) {
        const int8_t* qg = q + r * in_f + g * group;
        float* out = buf + (r - r0) * in_f + g * group;
        const float sg = s[r * per_row + g];
        for (int64_t i = 0; i < group; ++i) out[i] = static_cast<float>(qg[i]) * sg;
      }
    }
  });
  return WK_OK;
}
