// CPU kernels for INT4 projection matrices (spec: weightkit/ops/int4.py): group-wise asymmetric quantize + pack,
// unpack + dequantize, and a matmul that dequantizes the INT4 matrix one block of rows at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dequant_matmul.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& x, int64_t group_size) {
  TORCH_CHECK(x.is_contiguous(), "quantize_int4_kernel: x must be contiguous");
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && x.numel() % group_size == 0,
              "quantize_int4_kernel: bad group_size");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t n = xf.numel(), groups = n / group_size;
  auto packed = at::empty({n / 2}, x.options().dtype(at::kByte));
  auto scale = at::empty({groups}, x.options().dtype(at::kFloat));
  auto zero = at::empty({groups}, x.options().dtype(at::kByte));
  const float* xp = xf.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  uint8_t* zp = zero.data_ptr<uint8_t>();
  at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / group_size), [&](int64_t a, int64_t b) {
    std::vector<float> scratch(group_size);
    for (int64_t g = a; g < b; ++g) {
      quantize_group(xp + g * group_size, group_size, pp + g * group_size / 2, sp + g, zp + g, scratch.data());
    }
  });
  return {packed, scale, zero};
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

at::Tensor dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                               int64_t group_size) {
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "dequantize_int4_kernel: inputs must be contiguous");
  const int64_t n = packed.numel() * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && n % group_size == 0 && scale.numel() == n / group_size,
              "dequantize_int4_kernel: bad group_size");
  auto out = at::empty({n}, scale.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t groups = n / group_size;
  at::parallel_for(0, groups, std::max<int64_t>(1, 32768 / group_size), [&](int64_t a, int64_t b) {
    dequantize_range(pp, sp, zp, group_size, a * group_size, b * group_size, op + a * group_size);
  });
  return out;
}

// y = x W^T or x W with W (rows x cols) the dequantized INT4 matrix (see ../dequant_matmul.h).
at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group_size, int64_t rows, int64_t cols, bool transpose) {
  TORCH_CHECK(x.dim() == 2 && packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "int4_matmul_kernel: x must be 2-D and the INT4 matrix contiguous");
  TORCH_CHECK(packed.numel() * 2 == rows * cols, "int4_matmul_kernel: packed does not hold rows x cols values");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  const int64_t block_rows = (int64_t{1} << 22) / std::max<int64_t>(cols, 1);  // ~4M values (16 MB) per block
  return blocked_dequant_matmul(x, rows, cols, transpose, block_rows, [&](float* dst, int64_t r0, int64_t nr) {
    const int64_t e0 = r0 * cols, e1 = (r0 + nr) * cols, chunk = 16384;
    at::parallel_for(0, (e1 - e0 + chunk - 1) / chunk, 1, [&](int64_t a, int64_t b) {
      for (int64_t c = a; c < b; ++c) {
        const int64_t s = e0 + c * chunk, e = std::min(e1, s + chunk);
        dequantize_range(pp, sp, zp, group_size, s, e, dst + (s - e0));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) {
  m.impl("quantize_int4_kernel", &quantize_int4_cpu);
  m.impl("dequantize_int4_kernel", &dequantize_int4_cpu);
  m.impl("int4_matmul_kernel", &int4_matmul_cpu);
}

}  // namespace weightkit
