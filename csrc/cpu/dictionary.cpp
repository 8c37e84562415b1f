// CPU kernels of the sparse-dense dictionary gather (spec: weightkit/ops/dictionary.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace weightkit {
namespace {

// Indices arrive as uint8/int16/int32/int64; widen them once to int64 (s x d_out, small) for the backward.
at::Tensor wide(const at::Tensor& indices) { return indices.to(at::kLong).contiguous(); }

// Forward: tasks are (block of kRows tokens, block of kCols output columns), so one token still spreads over the
// threads, and each value/index is read once per kRows tokens (not once per token) while the block's z rows stay
// in cache. The index type stays compact (no widened copy).
constexpr int64_t kCols = 256;
constexpr int64_t kRows = 16;

template <typename index_t>
void gather_forward(const float* zp, const float* vp, const index_t* ip, float* yp, int64_t n, int64_t k, int64_t s,
                    int64_t d_out) {
  const int64_t col_blocks = (d_out + kCols - 1) / kCols, row_blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
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
                               int64_t d_out) {
  at::parallel_for(0, d_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float* yj = yt + j * n;
      for (int64_t r = 0; r < n; ++r) yj[r] = 0.f;
      for (int64_t t = 0; t < s; ++t) {
        axpy_f32(yj, vp[t * d_out + j], zt + static_cast<int64_t>(ip[t * d_out + j]) * n, n);
      }
    }
  });
}

constexpr int64_t kTransposedTokens = 4;

at::Tensor dict_sparse_gather_cpu(const at::Tensor& z, const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK(z.dim() == 2 && values.dim() == 2 && indices.sizes() == values.sizes(),
              "dict_sparse_gather_kernel: need z (n, k), values and indices (s, d_out)");
  const int64_t n = z.size(0), k = z.size(1), s = values.size(0), d_out = values.size(1);
  const at::Tensor zf = z.to(at::kFloat).contiguous(), vf = values.to(at::kFloat).contiguous();
  const at::Tensor idx = indices.contiguous();
  const float* vp = vf.data_ptr<float>();
  if (n >= kTransposedTokens) {
    const at::Tensor zt = zf.t().contiguous();
    auto yt = at::empty({d_out, n}, zf.options());
    const float* ztp = zt.data_ptr<float>();
    float* ytp = yt.data_ptr<float>();
    switch (idx.scalar_type()) {
      case at::kByte: gather_forward_transposed(ztp, vp, idx.data_ptr<uint8_t>(), ytp, n, s, d_out); break;
      case at::kShort: gather_forward_transposed(ztp, vp, idx.data_ptr<int16_t>(), ytp, n, s, d_out); break;
      case at::kInt: gather_forward_transposed(ztp, vp, idx.data_ptr<int32_t>(), ytp, n, s, d_out); break;
      case at::kLong: gather_forward_transposed(ztp, vp, idx.data_ptr<int64_t>(), ytp, n, s, d_out); break;
      default: TORCH_CHECK(false, "dict_sparse_gather_kernel: indices must be uint8, int16, int32 or int64");
    }
    return yt.t().contiguous().to(z.scalar_type());
  }
  auto y = at::empty({n, d_out}, zf.options());
  const float* zp = zf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (idx.scalar_type()) {
    case at::kByte: gather_forward(zp, vp, idx.data_ptr<uint8_t>(), yp, n, k, s, d_out); break;
    case at::kShort: gather_forward(zp, vp, idx.data_ptr<int16_t>(), yp, n, k, s, d_out); break;
    case at::kInt: gather_forward(zp, vp, idx.data_ptr<int32_t>(), yp, n, k, s, d_out); break;
    case at::kLong: gather_forward(zp, vp, idx.data_ptr<int64_t>(), yp, n, k, s, d_out); break;
    default: TORCH_CHECK(false, "dict_sparse_gather_kernel: indices must be uint8, int16, int32 or int64");
  }
  return y.to(z.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> dict_sparse_gather_backward_cpu(const at::Tensor& grad, const at::Tensor& z,
                                                                    const at::Tensor& values,
                                                                    const at::Tensor& indices) {
  const int64_t n = z.size(0), k = z.size(1), s = values.size(0), d_out = values.size(1);
  const at::Tensor gf = grad.to(at::kFloat).contiguous(), zf = z.to(at::kFloat).contiguous();
  const at::Tensor vf = values.to(at::kFloat).contiguous(), idx = wide(indices);
  auto gz = at::zeros({n, k}, zf.options());
  auto gv = at::zeros({s, d_out}, zf.options());
  const float* gp = gf.data_ptr<float>();
  const float* zp = zf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* gzp = gz.data_ptr<float>();
  float* gvp = gv.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {  // each thread owns its rows of grad_z
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t t = 0; t < s; ++t) {
        for (int64_t j = 0; j < d_out; ++j) gzp[r * k + ip[t * d_out + j]] += vp[t * d_out + j] * gp[r * d_out + j];
      }
    }
  });
  // Each thread owns a range of output columns j for every t and sums over tokens in order (deterministic);
  // the inner loop runs along contiguous rows of grad, values and indices.
  at::parallel_for(0, d_out, 64, [&](int64_t begin, int64_t end) {
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
  return {gz.to(z.scalar_type()), gv.to(values.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) {
  m.impl("dict_sparse_gather_kernel", &dict_sparse_gather_cpu);
  m.impl("dict_sparse_gather_backward_kernel", &dict_sparse_gather_backward_cpu);
}

}  // namespace weightkit
