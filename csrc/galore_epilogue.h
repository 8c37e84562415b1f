// The weight update shared by the CPU and CUDA GaLore kernels (spec: weightkit/ops/galore.py):
// W <- decay * W - step_size * scale * decay * (P U | U P). For float32 weights BLAS writes straight into W (no
// full-size temporary); bf16/fp16 weights go through one float32 m x n product, since BLAS has no mixed-precision
// in-place addmm.
#pragma once
#include <ATen/ATen.h>

namespace weightkit {

inline void galore_apply_update(at::Tensor& weight, const at::Tensor& ortho, const at::Tensor& update, bool left,
                                double step_size, double scale, double decay) {
  const double alpha = -step_size * scale * decay;
  if (weight.scalar_type() == at::kFloat) {
    if (left) {
      weight.addmm_(ortho, update, decay, alpha);
    } else {
      weight.addmm_(update, ortho, decay, alpha);
    }
    return;
  }
  at::Tensor full = left ? at::mm(ortho, update) : at::mm(update, ortho);
  full.mul_(alpha).add_(weight.to(at::kFloat), decay);
  weight.copy_(full);
}

}  // namespace weightkit
