// CPU kernel of the 8-bit blockwise Adam moments updated in one pass (spec: weightkit/ops/moments8bit.py,
// blockwise8bit_adam_reference): per block of 256 elements, decode both moments (code[q] * absmax), update them with
// the gradient, write Adam's direction, then re-encode each moment (new absmax, nearest code by the midpoints) in
// place. Every operation is one float32 rounding as in the reference (no fused multiply-add: the build's
// -ffp-contract=off; std::sqrt of a float is correctly rounded), so the codes, absmaxes and direction are the
// reference's bit for bit.
#include <cmath>
#include <cstdint>

#include "../weightkit.h"
#include "parallel.h"

namespace {

constexpr int64_t kBlock = 256;

// Codes and absmax of the block's new values x[0 .. len) (the reference's quantize_reference of one block). The
// code of a value is the number of the 255 sorted midpoints strictly below it (torch.bucketize, right=False): an
// 8-step binary search, run for the whole block step by step (each step's 256 comparisons are independent, where
// one value's eight steps form a chain of dependent loads) and branch-free (a comparison becomes a mask: on random
// data a branch would be mispredicted half the time). A NaN is above every midpoint (code 255), as torch.bucketize
// puts it: the test is "not (midpoint >= x)".
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  // with AVX2 each step's loads can be gathers
#endif
void search_block(const float* s, int64_t len, const float* bounds, int32_t* idx) {
  for (int64_t i = 0; i < len; ++i) idx[i] = 0;
  for (int width = 128; width >= 1; width >>= 1) {
    for (int64_t i = 0; i < len; ++i) idx[i] += width & -static_cast<int32_t>(!(bounds[idx[i] + width - 1] >= s[i]));
  }
}

inline void requantize(const float* x, int64_t len, const float* bounds, uint8_t* q, float* absmax_out) {
  float absmax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(x[i]);
    absmax = a > absmax ? a : absmax;
    nan |= std::isnan(a);
  }
  if (nan) absmax = std::nanf("");  // amax propagates NaN
  const float tiny = 1e-38f;  // the reference's clamp_min(1e-38) on float32 (a subnormal)
  const float inv = 1.0f / (absmax < tiny ? tiny : absmax);
  float s[kBlock];
  int32_t idx[kBlock];
  for (int64_t i = 0; i < len; ++i) {
    const float v = x[i] * inv;
    s[i] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);  // torch.clamp: NaN stays NaN
  }
  search_block(s, len, bounds, idx);
  for (int64_t i = 0; i < len; ++i) q[i] = static_cast<uint8_t>(idx[i]);
  *absmax_out = absmax;
}

}  // namespace

WK_API int wk_cpu_blockwise8bit_adam(const float* low, uint8_t* exp_avg_q, float* exp_avg_absmax,
                                     uint8_t* exp_avg_sq_q, float* exp_avg_sq_absmax, const float* code_signed,
                                     const float* code_unsigned, float* direction, int64_t n, float beta1,
                                     float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                                     const float* found_inf, int threads) {
  if (found_inf != nullptr && *found_inf != 0.0f) {  // a skipped step: the moments stay, the direction is 0
    weightkit::parallel_for(threads, 0, n, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) direction[i] = 0.0f;
    });
    return WK_OK;
  }
  float bounds_s[255], bounds_u[255];  // (code[i] + code[i + 1]) / 2, as code_midpoints
  for (int i = 0; i < 255; ++i) {
    bounds_s[i] = (code_signed[i] + code_signed[i + 1]) / 2.0f;
    bounds_u[i] = (code_unsigned[i] + code_unsigned[i + 1]) / 2.0f;
  }
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  weightkit::parallel_for(threads, 0, blocks, 16, [&](int64_t b0, int64_t b1) {
    float m[kBlock], v[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t len = n - start < kBlock ? n - start : kBlock;
      const float ma = exp_avg_absmax[b], va = exp_avg_sq_absmax[b];
      for (int64_t i = 0; i < len; ++i) {
        const float g = low[start + i];
        const float mi = code_signed[exp_avg_q[start + i]] * ma * beta1 + g * one_minus_beta1;
        const float vi = code_unsigned[exp_avg_sq_q[start + i]] * va * beta2 + (g * g) * one_minus_beta2;
        m[i] = mi;
        v[i] = vi;
        direction[start + i] = mi / (std::sqrt(vi) + eps);
      }
      requantize(m, len, bounds_s, exp_avg_q + start, exp_avg_absmax + b);
      requantize(v, len, bounds_u, exp_avg_sq_q + start, exp_avg_sq_absmax + b);
    }
  });
  return WK_OK;
}
