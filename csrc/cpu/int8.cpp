// CPU kernels for INT8 stochastic rounding (spec: weightkit/ops/int8.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../dequant_matmul.h"
#include "../philox.h"

namespace weightkit {
namespace {

at::Tensor stochastic_round_int8_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t group_size, int64_t seed,
                                     int64_t offset) {
  TORCH_CHECK(x.is_contiguous() && scale.is_contiguous(), "stochastic_round_int8_kernel: inputs must be contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "stochastic_round_int8_kernel: scale must be float32");
  TORCH_CHECK(group_size > 0 && x.numel() % group_size == 0, "stochastic_round_int8_kernel: bad group_size");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const uint64_t first = static_cast<uint64_t>(offset), last = first + static_cast<uint64_t>(n);
  const float* s = scale.data_ptr<float>();
  int8_t* q = out.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stochastic_round_int8_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // One Philox call feeds four consecutive stream positions.
    const int64_t block_begin = static_cast<int64_t>(first >> 2), block_end = static_cast<int64_t>((last + 3) >> 2);
    at::parallel_for(block_begin, block_end, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Philox4 r = philox4x32_10(static_cast<uint64_t>(b), static_cast<uint64_t>(seed));
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
  });
  return out;
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

void int8_sr_update_cpu(at::Tensor w_q, at::Tensor scale, const at::Tensor& delta, int64_t group_size, double decay,
                        int64_t seed, int64_t offset) {
  TORCH_CHECK(w_q.is_contiguous() && scale.is_contiguous() && delta.is_contiguous(),
              "int8_sr_update_kernel: inputs must be contiguous");
  TORCH_CHECK(group_size > 0 && w_q.numel() % group_size == 0 && scale.numel() == w_q.numel() / group_size,
              "int8_sr_update_kernel: bad group_size");
  const int64_t groups = scale.numel();
  int8_t* q = w_q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "int8_sr_update_cpu", [&] {
    const scalar_t* d = delta.data_ptr<scalar_t>();
    at::parallel_for(0, groups, std::max<int64_t>(1, 8192 / group_size), [&](int64_t a, int64_t b) {
      sr_update_groups<scalar_t>(q, sp, d, a, b, group_size, static_cast<float>(decay), static_cast<uint64_t>(seed),
                                 static_cast<uint64_t>(offset));
    });
  });
}

// Dequantize rows [r0, r1) of w_q (out x in, in % group == 0) into buf (float32, (r1 - r0) x in), group by group.
void dequantize_rows(const int8_t* q, const float* s, float* buf, int64_t r0, int64_t r1, int64_t in_f, int64_t group) {
  const int64_t per_row = in_f / group;
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      for (int64_t g = 0; g < per_row; ++g) {
        const int8_t* qg = q + r * in_f + g * group;
        float* out = buf + (r - r0) * in_f + g * group;
        const float sg = s[r * per_row + g];
        for (int64_t i = 0; i < group; ++i) out[i] = static_cast<float>(qg[i]) * sg;
      }
    }
  });
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

// Few-token path: read the int8 weight once, never dequantize it into memory.
//   transpose=false: y[t, o] = sum_g s[o, g] * dot(x[t, group g], q[o, group g])   (parallel over rows o)
//   transpose=true:  y[t, :] += (x[t, o] * s[o, g]) * q[o, group g]               (parallel over column groups)
at::Tensor int8_matvec_cpu(const at::Tensor& xf, const at::Tensor& w_q, const at::Tensor& scale, int64_t group,
                           bool transpose) {
  const int64_t out_f = w_q.size(0), in_f = w_q.size(1), tokens = xf.size(0), per_row = in_f / group;
  const int8_t* q = w_q.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* x = xf.data_ptr<float>();
  if (!transpose) {
    at::Tensor y = at::empty({tokens, out_f}, xf.options());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, out_f, 16, [&](int64_t a, int64_t b) {
      for (int64_t o = a; o < b; ++o) {
        for (int64_t t = 0; t < tokens; ++t) {
          float acc = 0.0f;
          for (int64_t g = 0; g < per_row; ++g) {
            acc += s[o * per_row + g] * dot_f32_i8(x + t * in_f + g * group, q + o * in_f + g * group, group);
          }
          yp[t * out_f + o] = acc;
        }
      }
    });
    return y;
  }
  at::Tensor y = at::zeros({tokens, in_f}, xf.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, per_row, std::max<int64_t>(1, 512 / group), [&](int64_t a, int64_t b) {
    for (int64_t o = 0; o < out_f; ++o) {
      for (int64_t t = 0; t < tokens; ++t) {
        const float xo = x[t * out_f + o];
        for (int64_t g = a; g < b; ++g) {
          axpy_i8(yp + t * in_f + g * group, xo * s[o * per_row + g], q + o * in_f + g * group, group);
        }
      }
    }
  });
  return y;
}

// y = x W^T (transpose=false) or y = x W (transpose=true), W = dequant(w_q). Up to kMatvecTokens tokens: the
// int8 matrix-vector path above. More tokens: one block of rows of W is dequantized at a time and multiplied by
// BLAS, so the dequantized weight never exists whole.
constexpr int64_t kMatvecTokens = 8;

at::Tensor int8_matmul_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale, int64_t group_size,
                           bool transpose) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w_q.is_contiguous() && scale.is_contiguous(),
              "int8_matmul_kernel: x must be 2-D and inputs contiguous");
  TORCH_CHECK(w_q.size(1) % group_size == 0, "int8_matmul_kernel: group_size must divide in_features");
  const int64_t out_f = w_q.size(0), in_f = w_q.size(1), tokens = x.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  if (tokens <= kMatvecTokens) {
    return int8_matvec_cpu(xf, w_q, scale, group_size, transpose).to(x.scalar_type());
  }
  const int8_t* q = w_q.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t block_rows = (int64_t{1} << 22) / std::max<int64_t>(in_f, 1);  // ~4M values (16 MB) per block
  return blocked_dequant_matmul(xf, out_f, in_f, transpose, block_rows, [&](float* dst, int64_t r0, int64_t nr) {
    dequantize_rows(q, s, dst, r0, r0 + nr, in_f, group_size);
  }).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) {
  m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cpu);
  m.impl("int8_matmul_kernel", &int8_matmul_cpu);
  m.impl("int8_sr_update_kernel", &int8_sr_update_cpu);
}

}  // namespace weightkit
