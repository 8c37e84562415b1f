// The blocked "dequantize, then BLAS" matmul shared by the CPU and CUDA kernels of int8_matmul and int4_matmul
// (specs: weightkit/ops/int8.py, weightkit/ops/int4.py). W (rows x cols) is a quantized matrix; `dequant(dst, r0,
// nr)` writes rows [r0, r0 + nr) of it as float32 into dst (nr x cols, contiguous). At most `block_rows` rows are
// dequantized at a time, so the float weight never exists whole:
//   transpose = false:  Y = X W^T  (X: tokens x cols), block by block into Y^T (rows x tokens): each block's result
//                       is a contiguous row range of Y^T that BLAS writes in place; one transpose at the end;
//                       a single block writes Y = X W^T directly.
//   transpose = true:   Y = X W    (X: tokens x rows), Y += X[:, r0:r0+nr] W[r0:r0+nr, :].
// X may have any strides (BLAS takes transposed views without copies). Accumulation is float32; the result has X's
// dtype.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace weightkit {

template <typename Dequant>
at::Tensor blocked_dequant_matmul(const at::Tensor& x, int64_t rows, int64_t cols, bool transpose, int64_t block_rows,
                                  Dequant&& dequant) {
  const int64_t tokens = x.size(0);
  const int64_t step = std::max<int64_t>(1, std::min(rows, block_rows));
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor buf = at::empty({step, cols}, opts);
  at::Tensor y;
  if (transpose) {
    y = at::zeros({tokens, cols}, opts);
  } else if (step == rows) {
    y = at::empty({tokens, rows}, opts);
  } else {
    y = at::empty({rows, tokens}, opts);  // Y^T
  }
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t nr = std::min(rows - r0, step);
    at::Tensor block = buf.narrow(0, 0, nr);
    dequant(block.data_ptr<float>(), r0, nr);
    if (transpose) {
      y.addmm_(xf.narrow(1, r0, nr), block);  // Y += X[:, r0:r0+nr] W[r0:r0+nr, :]
    } else if (step == rows) {
      at::mm_out(y, xf, block.t());  // Y = X W^T
    } else {
      at::Tensor dst = y.narrow(0, r0, nr);  // contiguous rows of Y^T
      at::mm_out(dst, block, xf.t());        // Y^T[r0:r0+nr, :] = W[r0:r0+nr, :] X^T
    }
  }
  if (!transpose && step != rows) y = y.t().contiguous();
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace weightkit
