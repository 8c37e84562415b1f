"""Triton kernels of the sparse-dense dictionary gather (spec: weightkit.ops.dictionary).

Forward: a program per (block of tokens, column tile) loops over the s nonzeros of its columns, gathering
z[rows, indices[t, cols]] and accumulating values * z in fp32. Backward: grad_values by a program per column tile
looping over token blocks (a fixed-order sum); grad_z by atomics.
"""

import torch
import triton
import triton.language as tl

from ._host import cdiv


@triton.jit
def _gather_forward_kernel(z_ptr, v_ptr, i_ptr, y_ptr, n, k, s, d_out, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < n, cols < d_out
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for t in range(0, s):
        v = tl.load(v_ptr + t * d_out + cols, mask=cmask, other=0.0).to(tl.float32)
        idx = tl.load(i_ptr + t * d_out + cols, mask=cmask, other=0).to(tl.int64)
        zg = tl.load(z_ptr + rows[:, None].to(tl.int64) * k + idx[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += v[None, :] * zg
    tl.store(y_ptr + rows[:, None] * d_out + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gather_backward_kernel(g_ptr, z_ptr, v_ptr, i_ptr, gz_ptr, gv_ptr, n, k, s, d_out, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    cmask = cols < d_out
    v = tl.load(v_ptr + t * d_out + cols, mask=cmask, other=0.0).to(tl.float32)
    idx = tl.load(i_ptr + t * d_out + cols, mask=cmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        m2 = (rows[:, None] < n) & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * d_out + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rows[:, None].to(tl.int64) * k + idx[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(g * zg, axis=0)
        tl.atomic_add(gz_ptr + rows[:, None].to(tl.int64) * k + idx[None, :], v[None, :] * g, mask=m2)
    tl.store(gv_ptr + t * d_out + cols, acc, mask=cmask)


def dict_sparse_gather_triton(z, values, indices, block_t=16, block_n=64):
    n, k = z.shape
    s, d_out = values.shape
    y = torch.empty((n, d_out), dtype=z.dtype, device=z.device)
    grid = (cdiv(n, block_t), cdiv(d_out, block_n))
    _gather_forward_kernel[grid](z, values, indices.to(torch.int32), y, n, k, s, d_out, BLOCK_T=block_t, BLOCK_N=block_n)
    return y


def dict_sparse_gather_backward_triton(grad, z, values, indices, block_t=16, block_n=64):
    n, k = z.shape
    s, d_out = values.shape
    gz = torch.zeros((n, k), dtype=torch.float32, device=z.device)
    gv = torch.empty((s, d_out), dtype=torch.float32, device=z.device)
    grid = (cdiv(d_out, block_n), s)
    _gather_backward_kernel[grid](grad, z, values, indices.to(torch.int32), gz, gv, n, k, s, d_out, BLOCK_T=block_t,
                                  BLOCK_N=block_n)
    return gz.to(z.dtype), gv.to(values.dtype)
