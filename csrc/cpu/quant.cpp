// CPU kernels for INT8 stochastic rounding (spec: weightkit/ops/quant.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

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

// Dequantize rows [r0, r1) of w_q (out x in) into buf (float32, (r1 - r0) x in).
void dequantize_rows(const int8_t* q, const float* s, float* buf, int64_t r0, int64_t r1, int64_t in_f, int64_t group) {
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int8_t* qr = q + r * in_f;
      float* out = buf + (r - r0) * in_f;
      for (int64_t i = 0; i < in_f; ++i) out[i] = static_cast<float>(qr[i]) * s[(r * in_f + i) / group];
    }
  });
}

// y = x W^T (transpose=false) or y = x W (transpose=true), W = dequant(w_q), one block of rows of W at a time:
// the dequantized weight never exists whole.
at::Tensor int8_matmul_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& scale, int64_t group_size,
                           bool transpose) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w_q.is_contiguous() && scale.is_contiguous(),
              "int8_matmul_kernel: x must be 2-D and inputs contiguous");
  const int64_t out_f = w_q.size(0), in_f = w_q.size(1), tokens = x.size(0);
  constexpr int64_t kRows = 128;
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y = at::zeros({tokens, transpose ? in_f : out_f}, x.options().dtype(at::kFloat));
  at::Tensor buf = at::empty({std::min(kRows, out_f), in_f}, x.options().dtype(at::kFloat));
  const int8_t* q = w_q.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  for (int64_t r0 = 0; r0 < out_f; r0 += kRows) {
    const int64_t r1 = std::min(out_f, r0 + kRows), rows = r1 - r0;
    at::Tensor block = buf.narrow(0, 0, rows);
    dequantize_rows(q, s, block.data_ptr<float>(), r0, r1, in_f, group_size);
    if (transpose) {
      y.addmm_(xf.narrow(1, r0, rows), block);  // y += x[:, r0:r1] W[r0:r1, :]
    } else {
      y.narrow(1, r0, rows).copy_(at::mm(xf, block.t()));  // y[:, r0:r1] = x W[r0:r1, :]^T
    }
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) {
  m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cpu);
  m.impl("int8_matmul_kernel", &int8_matmul_cpu);
}

}  // namespace weightkit
