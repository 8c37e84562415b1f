// CPU kernels of the MemoryFormer lookup (spec: weightkit/ops/memoryformer.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

at::Tensor memory_lookup_forward_cpu(const at::Tensor& x, const at::Tensor& tables, double t) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && tables.is_contiguous(), "memory_lookup_forward_kernel: bad inputs");
  const int64_t n = x.size(0), K = tables.size(0), buckets = tables.size(1), d_out = tables.size(2);
  const int tau = static_cast<int>(std::log2(static_cast<double>(buckets)));
  const float inv_t2 = static_cast<float>(2.0 / t);
  auto y = at::empty({n, d_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "memory_fwd_x", [&] {
    using xt = scalar_t;
    const xt* xp = x.data_ptr<xt>();
    xt* yp = y.data_ptr<xt>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables.scalar_type(), "memory_fwd_t", [&] {
      const scalar_t* tp = tables.data_ptr<scalar_t>();
      // Hash every chunk once (n x K buckets and weights), then split the sums over (token, column block) tasks,
      // so that a single token still uses every thread. Per output element the K rows are added in order k = 0, 1,
      // ..., whatever the split: the result does not depend on the thread count.
      std::vector<int64_t> hs(n * K);
      std::vector<float> ps(n * K);
      at::parallel_for(0, n * K, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) hash_chunk(xp + i * tau, tau, inv_t2, &hs[i], &ps[i]);
      });
      constexpr int64_t kCols = 256;
      const int64_t col_blocks = (d_out + kCols - 1) / kCols;
      at::parallel_for(0, n * col_blocks, 1, [&](int64_t begin, int64_t end) {
        float acc[kCols];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t r = task / col_blocks, j0 = (task % col_blocks) * kCols, len = std::min(kCols, d_out - j0);
          std::fill(acc, acc + len, 0.f);
          for (int64_t k = 0; k < K; ++k) {
            const float p = ps[r * K + k];
            const scalar_t* row = tp + (k * buckets + hs[r * K + k]) * d_out + j0;
            for (int64_t j = 0; j < len; ++j) acc[j] += p * static_cast<float>(row[j]);
          }
          for (int64_t j = 0; j < len; ++j) yp[r * d_out + j0 + j] = static_cast<xt>(acc[j]);
        }
      });
    });
  });
  return y;
}

// grad_x: one pass over tokens. grad_tables: one thread per table, tokens in order, so the sums are always
// deterministic (no atomics on CPU); `deterministic` is accepted for the common schema.
std::tuple<at::Tensor, at::Tensor> memory_lookup_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& tables, double t, bool deterministic) {
  (void)deterministic;
  TORCH_CHECK(x.dim() == 2 && grad.dim() == 2 && x.is_contiguous() && grad.is_contiguous() && tables.is_contiguous(),
              "memory_lookup_backward_kernel: bad inputs");
  const int64_t n = x.size(0), K = tables.size(0), buckets = tables.size(1), d_out = tables.size(2);
  const int tau = static_cast<int>(std::log2(static_cast<double>(buckets)));
  const float inv_t2 = static_cast<float>(2.0 / t);
  const at::Tensor xf = x.to(at::kFloat), gf = grad.to(at::kFloat), tf = tables.to(at::kFloat);
  auto gx = at::empty({n, K * tau}, xf.options());
  auto gt = at::zeros({K, buckets, d_out}, tf.options());
  auto hs = at::empty({n, K}, xf.options().dtype(at::kLong));
  auto ps = at::empty({n, K}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* gp = gf.data_ptr<float>();
  const float* tp = tf.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  float* gtp = gt.data_ptr<float>();
  int64_t* hp = hs.data_ptr<int64_t>();
  float* pp = ps.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = 0; r < n; ++r) {
        const float p = pp[r * K + k];
        float* row = gtp + (k * buckets + hp[r * K + k]) * d_out;
        for (int64_t j = 0; j < d_out; ++j) row[j] += p * gp[r * d_out + j];
      }
    }
  });
  return {gx.to(x.scalar_type()), gt.to(tables.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) {
  m.impl("memory_lookup_forward_kernel", &memory_lookup_forward_cpu);
  m.impl("memory_lookup_backward_kernel", &memory_lookup_backward_cpu);
}

}  // namespace weightkit
