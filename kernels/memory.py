"""Triton kernels of the MemoryFormer lookup (spec: weightkit.ops.memory).

Forward: a program per (block of tokens, column tile) loops over the K tables: it loads the chunk's tau values,
builds the bucket from the sign bits and the weight p, gathers the table rows of its column tile and accumulates
in fp32 (masked columns, so any d_out works). Backward: a program per (block of tokens, table) computes
<g, T[k, h]> over column tiles and the input gradient; the table gradient is added with atomics, or, when
deterministic, summed per bucket in token order over a stable sort of the keys: a program per (sorted position,
column tile) works only where a bucket's run starts, walking the run in order (grid from shapes alone, so no host
sync; O(n K) extra memory).
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


@triton.jit
def _segment_sum_kernel(key_ptr, order_ptr, p_ptr, g_ptr, gt_ptr, total, K, d_out, BLOCK_N: tl.constexpr):
    """gt[key, tile] = sum of p * g over the run of equal sorted keys starting at position e, in sorted order; a
    program whose position is not a run start (key equal to the one before) does nothing."""
    e = tl.program_id(0).to(tl.int64)
    key = tl.load(key_ptr + e)
    prev = tl.load(key_ptr + tl.maximum(e - 1, 0), mask=e > 0, other=-1)  # keys are >= 0: -1 never matches
    if prev != key:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < d_out
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        f = e
        cur = key
        while cur == key:
            flat = tl.load(order_ptr + f)  # index into the (n, K) arrays: token flat // K
            p = tl.load(p_ptr + flat)
            g = tl.load(g_ptr + (flat // K) * d_out + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += p * g
            f += 1
            cur = tl.load(key_ptr + tl.minimum(f, total - 1), mask=f < total, other=-1)
        tl.store(gt_ptr + key * d_out + cols, acc, mask=cmask)


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
    if deterministic and n * K > 0 and d_out > 0:
        # stable sort keeps token order inside a bucket; each bucket's run is summed sequentially in that order
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        seg_n = max(16, min(512, triton.next_power_of_2(d_out)))
        _segment_sum_kernel[(n * K, triton.cdiv(d_out, seg_n))](sorted_keys, order, ps, grad, gt, n * K, K, d_out,
                                                                BLOCK_N=seg_n)
    return gx.to(x.dtype), gt.to(tables.dtype)
