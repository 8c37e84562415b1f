// CPU kernel of the fused GaLore Adam step (spec: weightkit/ops/galore.py): the low-rank Adam moments and U in one
// pass. The projection back into the weight (W <- decay W - step_size scale decay P U, BLAS addmm_ straight into W)
// is done by torch in weightkit/backends/cpu.
#include <cmath>

#include "../weightkit.h"
#include "parallel.h"

WK_API int wk_cpu_low_rank_adam(const float* r, float* m, float* v, float* u, int64_t n, float b1, float b2, float e,
                                int threads) {
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
  weightkit::parallel_for(threads, 0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = r[i];
      const float mi = m[i] * b1 + c1 * g;
      const float vi = v[i] * b2 + c2 * g * g;
      m[i] = mi;
      v[i] = vi;
      u[i] = mi / (std::sqrt(vi) + e);
    }
  });
  return WK_OK;
}
