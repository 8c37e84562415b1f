// CPU kernel of the fused GaLore Adam step (spec: weightkit/ops/galore.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../galore_epilogue.h"

#include <cmath>

namespace weightkit {
namespace {

// M, V updated in place and U = M / (sqrt(V) + eps) written in one pass over the low-rank tensors.
at::Tensor low_rank_adam(const at::Tensor& low_grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, double beta1,
                         double beta2, double eps) {
  auto update = at::empty_like(low_grad);
  const float* r = low_grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  float* u = update.data_ptr<float>();
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), e = static_cast<float>(eps);
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
  at::parallel_for(0, low_grad.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = r[i];
      const float mi = m[i] * b1 + c1 * g;
      const float vi = v[i] * b2 + c2 * g * g;
      m[i] = mi;
      v[i] = vi;
      u[i] = mi / (std::sqrt(vi) + e);
    }
  });
  return update;
}

void galore_adam_update_cpu(at::Tensor weight, const at::Tensor& low_grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                            const at::Tensor& ortho, bool left, double beta1, double beta2, double eps,
                            double step_size, double scale, double decay) {
  TORCH_CHECK(weight.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                  low_grad.is_contiguous() && ortho.is_contiguous(),
              "galore_adam_update_kernel: inputs must be contiguous");
  TORCH_CHECK(low_grad.scalar_type() == at::kFloat && exp_avg.scalar_type() == at::kFloat &&
                  exp_avg_sq.scalar_type() == at::kFloat && ortho.scalar_type() == at::kFloat,
              "galore_adam_update_kernel: low_grad, moments and ortho must be float32");
  at::Tensor update = low_rank_adam(low_grad, exp_avg, exp_avg_sq, beta1, beta2, eps);
  galore_apply_update(weight, ortho, update, left, step_size, scale, decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(weightkit, CPU, m) { m.impl("galore_adam_update_kernel", &galore_adam_update_cpu); }

}  // namespace weightkit
