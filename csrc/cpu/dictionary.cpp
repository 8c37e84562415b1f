// CPU kernels of the sparse-dense dictionary gather (spec: weightkit/ops/dictionary.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace weightkit {
namespace {

// Indices arrive as uint8/int16/int32/int64; widen them once to int64 (s x d_out, small).
at::Tensor wide(const at::Tensor& indices) { return indices.to(at::kLong).contiguous(); }

at::Tensor dict_sparse_gather_cpu(const at::Tensor& z, const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && values.is_contiguous(), "dict_sparse_gather_kernel: bad inputs");
  const int64_t n = z.size(0), k = z.size(1), s = values.size(0), d_out = values.size(1);
  const at::Tensor zf = z.to(at::kFloat).contiguous(), vf = values.to(at::kFloat).contiguous(), idx = wide(indices);
  auto y = at::empty({n, d_out}, zf.options());
  const float* zp = zf.data_ptr<float>();
  const float* vp = vf.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* zr = zp + r * k;
      float* yr = yp + r * d_out;
      for (int64_t j = 0; j < d_out; ++j) yr[j] = 0.f;
      for (int64_t t = 0; t < s; ++t) {  // row t of values/indices is contiguous over j
        const float* vt = vp + t * d_out;
        const int64_t* it = ip + t * d_out;
        for (int64_t j = 0; j < d_out; ++j) yr[j] += vt[j] * zr[it[j]];
      }
    }
  });
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
