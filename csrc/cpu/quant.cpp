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

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) { m.impl("stochastic_round_int8_kernel", &stochastic_round_int8_cpu); }

}  // namespace weightkit
