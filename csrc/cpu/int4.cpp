// CPU kernels for INT4 projection matrices (spec: weightkit/ops/int4.py): group-wise asymmetric quantize + pack and
// unpack + dequantize. The INT4 matmul dequantizes a block of rows at a time with wk_cpu_dequantize_int4 and
// multiplies it with torch's BLAS (weightkit/backends/cpu), so the float matrix never exists whole.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "../weightkit.h"
#include "parallel.h"

namespace weightkit {
namespace {

// Quantize one group of `gs` (even) fp32 values; writes gs / 2 bytes, its scale and zero point. `q` is a scratch
// buffer of gs floats: the rounding loop runs over contiguous floats (vectorizable), packing is a second pass.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void quantize_group(const float* g, int64_t gs, uint8_t* packed, float* scale, uint8_t* zero, float* q) {
  float lo = 0.0f, hi = 0.0f;  // the range always holds 0
  for (int64_t i = 0; i < gs; ++i) {
    lo = g[i] < lo ? g[i] : lo;
    hi = g[i] > hi ? g[i] : hi;
  }
  float s = (hi - lo) / 15.0f;
  if (s < std::numeric_limits<float>::min()) s = std::numeric_limits<float>::min();
  const float z = std::clamp(std::nearbyint(-lo / s), 0.0f, 15.0f);  // round half to even, as torch.round
  for (int64_t i = 0; i < gs; ++i) {
    const float v = std::nearbyint(g[i] / s + z);
    q[i] = v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v);
  }
  for (int64_t i = 0; i < gs; i += 2) {
    packed[i / 2] = static_cast<uint8_t>(static_cast<unsigned>(q[i]) | (static_cast<unsigned>(q[i + 1]) << 4));
  }
  *scale = s;
  *zero = static_cast<uint8_t>(z);
}

// Elements [e0, e1) (flat, row-major) of the dequantized matrix into out[0 .. e1 - e0), for any e0 <= e1 (an odd
// e0 starts on a high nibble); groups are walked in order, whole bytes in the inner loop (no per-element division).
inline void dequantize_range(const uint8_t* packed, const float* scale, const uint8_t* zero, int64_t group_size,
                             int64_t e0, int64_t e1, float* out) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t g = e / group_size;
    const int64_t end = std::min(e1, (g + 1) * group_size);
    const float s = scale[g], z = static_cast<float>(zero[g]);
    if (e & 1) {  // a high nibble first
      out[e - e0] = (static_cast<float>(packed[e >> 1] >> 4) - z) * s;
      ++e;
    }
    float* o = out + (e - e0);
    const uint8_t* b = packed + (e >> 1);
    const int64_t pairs = (end - e) / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      o[2 * j] = (static_cast<float>(b[j] & 0xF) - z) * s;
      o[2 * j + 1] = (static_cast<float>(b[j] >> 4) - z) * s;
    }
    e += 2 * pairs;
    if (e < end) {  // a trailing low nibble
      out[e - e0] = (static_cast<float>(packed[e >> 1] & 0xF) - z) * s;
      ++e;
    }
  }
}

}  // namespace
}  // namespace weightkit

using namespace weightkit;

WK_API int wk_cpu_quantize_int4(const float* x, uint8_t* packed, float* scale, uint8_t* zero, int64_t groups,
                                int64_t group_size, int threads) {
  std::atomic<bool> failed{false};
  parallel_for(threads, 0, groups, std::max<int64_t>(1, 16384 / group_size), [&](int64_t a, int64_t b) {
    Scratch<float> scratch(group_size);
    if (!scratch.ok()) {
      failed = true;
      return;
    }
    for (int64_t g = a; g < b; ++g) {
      quantize_group(x + g * group_size, group_size, packed + g * group_size / 2, scale + g, zero + g,
                     scratch.data());
    }
  });
  return failed ? WK_NO_MEMORY : WK_OK;
}

// Chunks of 16384 elements; at least two chunks per thread before the range is split.
WK_API int wk_cpu_dequantize_int4(const uint8_t* packed, const float* scale, const uint8_t* zero, float* out,
                                  int64_t group_size, int64_t e0, int64_t e1, int threads) {
  constexpr int64_t chunk = 16384;
  parallel_for(threads, 0, (e1 - e0 + chunk - 1) / chunk, 2, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const int64_t s = e0 + c * chunk, e = std::min(e1, s + chunk);
      dequantize_range(packed, scale, zero, group_size, s, e, out + (s - e0));
    }
  });
  return WK_OK;
}
