"""Triton kernels of the MemoryFormer lookup (spec: weightkit.ops.memory).

Forward: a program per (block of tokens, column tile) loops over the K tables: it loads the chunk's tau values,
builds the bucket from the sign bits and the weight p, gathers the table rows of its column tile and accumulates
in fp32 (masked columns, so any d_out works). Backward: a program per (block of tokens, table) computes
<g, T[k, h]> over column tiles and the input gradient; the table gradient is added with atomics, or, when
deterministic, summed per bucket in token order over a stable sort of the keys.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _hash(x_ptr, rows, row_mask, k, K, inv_t2, TAU: tl.constexpr, TAU_P2: tl.constexpr):
    """Bucket, weight and the chunk values (TAU_P2 columns, those past TAU masked to 0) of chunk k per row."""
    cols = tl.arange(0, TAU_P2)
    cmask = cols < TAU
    z = tl.load(x_ptr + rows[:, None] * (K * TAU) + k * TAU + cols[None, :], mask=row_mask[:, None] & cmask[None, :],
                other=0.0)
    z = z.to(tl.float32)
    bits = tl.where(z > 0, 1, 0).to(tl.int64) << cols[None, :].to(tl.int64)
    h = tl.sum(bits, axis=1)
    logp = tl.sum(tl.where(cmask[None, :], tl.log(tl.sigmoid(tl.abs(z) * inv_t2)), 0.0), axis=1)
    return h, tl.exp(logp), z


@triton.jit
def _memory_forward_kernel(x_ptr, t_ptr, y_ptr, n, K, d_out, inv_t2, TAU: tl.constexpr, TAU_P2: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    col_mask = cols < d_out
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):
        h, p, _ = _hash(x_ptr, rows, row_mask, k, K, inv_t2, TAU, TAU_P2)
        base = (k * (1 << TAU) + h) * d_out
        vals = tl.load(t_ptr + base[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += p[:, None] * vals.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * d_out + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _memory_backward_kernel(g_ptr, x_ptr, t_ptr, gx_ptr, gt_ptr, key_ptr, p_ptr, n, K, d_out, inv_t2,
                            ATOMICS: tl.constexpr, TAU: tl.constexpr, TAU_P2: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.program_id(1)
    row_mask = rows < n
    h, p, z = _hash(x_ptr, rows, row_mask, k, K, inv_t2, TAU, TAU_P2)
    base = (k * (1 << TAU) + h) * d_out
    dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, d_out, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = row_mask[:, None] & (cols[None, :] < d_out)
        g = tl.load(g_ptr + rows[:, None] * d_out + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        vals = tl.load(t_ptr + base[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dot += tl.sum(g * vals, axis=1)
        if ATOMICS:
            tl.atomic_add(gt_ptr + base[:, None] + cols[None, :], p[:, None] * g, mask=m2)
    sgn = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    gz = (dot * p * inv_t2)[:, None] * sgn * tl.sigmoid(-tl.abs(z) * inv_t2)
    tau_cols = tl.arange(0, TAU_P2)
    tl.store(gx_ptr + rows[:, None] * (K * TAU) + k * TAU + tau_cols[None, :], gz,
             mask=row_mask[:, None] & (tau_cols[None, :] < TAU))
    tl.store(key_ptr + rows * K + k, k * (1 << TAU) + h, mask=row_mask)
    tl.store(p_ptr + rows * K + k, p, mask=row_mask)


def memory_lookup_forward_triton(x, tables, t, block_t=16, block_n=64):
    n = x.shape[0]
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_t), triton.cdiv(d_out, block_n))
    _memory_forward_kernel[grid](x, tables, y, n, K, d_out, 2.0 / t, TAU=tau, TAU_P2=triton.next_power_of_2(tau),
                                 BLOCK_T=block_t, BLOCK_N=block_n)
    return y


def memory_lookup_backward_triton(grad, x, tables, t, deterministic, block_t=16, block_n=64):
    n = x.shape[0]
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    gx = torch.empty((n, K * tau), dtype=torch.float32, device=x.device)
    gt = torch.zeros((K, buckets, d_out), dtype=torch.float32, device=x.device)
    keys = torch.empty((n, K), dtype=torch.int64, device=x.device)
    ps = torch.empty((n, K), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_t), K)
    _memory_backward_kernel[grid](grad, x, tables, gx, gt, keys, ps, n, K, d_out, 2.0 / t, ATOMICS=not deterministic,
                                  TAU=tau, TAU_P2=triton.next_power_of_2(tau), BLOCK_T=block_t, BLOCK_N=block_n)
    if deterministic:
        # stable sort keeps token order inside a bucket; each bucket's rows are summed sequentially in that order
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        contrib = ps.reshape(-1)[order, None] * grad.to(torch.float32)[order // K]
        ends = counts.cumsum(0)
        sums = torch.cumsum(contrib.double(), 0)  # float64 prefix sums in a fixed order, then differences
        seg = sums[ends - 1] - torch.cat([sums.new_zeros(1, d_out), sums[ends[:-1] - 1]])
        gt.view(-1, d_out)[uniq] = seg.to(torch.float32)
    return gx.to(x.dtype), gt.to(tables.dtype)
