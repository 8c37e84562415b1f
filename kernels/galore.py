"""Triton kernels of the fused GaLore Adam step (spec: weightkit.ops.galore).

1. ``_low_rank_adam_kernel``: M, V updated in place and U = M / (sqrt(V) + eps), one pass over the low-rank tensors.
2. ``_matmul_update_kernel``: W <- decay W + alpha (A @ B) tile by tile; the product is never stored, and the
   weight is read and written once in its own dtype with fp32 accumulation.
"""

import torch
import triton
import triton.language as tl

from ._host import cdiv


@triton.jit
def _low_rank_adam_kernel(r_ptr, m_ptr, v_ptr, u_ptr, n, beta1, beta2, eps, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(r_ptr + idx, mask=mask, other=0.0)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
    v = tl.load(v_ptr + idx, mask=mask, other=0.0) * beta2 + (1.0 - beta2) * g * g
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)
    tl.store(u_ptr + idx, m / (tl.sqrt_rn(v) + eps), mask=mask)


@triton.jit
def _matmul_update_kernel(a_ptr, b_ptr, w_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_wm,
                          stride_wn, alpha, decay, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    w_mask = (rm[:, None] < M) & (rn[None, :] < N)
    w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w * decay + alpha * acc).to(w_ptr.dtype.element_ty), mask=w_mask)


def galore_adam_update_triton(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
                              decay, block=1024, block_m=32, block_n=32, block_k=32):
    update = torch.empty_like(low_grad)
    n = low_grad.numel()
    _low_rank_adam_kernel[(cdiv(n, block),)](low_grad, exp_avg, exp_avg_sq, update, n, beta1, beta2, eps,
                                                    BLOCK=block)
    a, b = (ortho, update) if left else (update, ortho)
    m_rows, n_cols = weight.shape
    k = a.shape[1]
    grid = (cdiv(m_rows, block_m), cdiv(n_cols, block_n))
    _matmul_update_kernel[grid](a, b, weight, m_rows, n_cols, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                weight.stride(0), weight.stride(1), -step_size * scale * decay, decay,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
