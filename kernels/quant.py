"""Triton kernels for INT8 stochastic rounding (spec: weightkit.ops.quant, weightkit.ops.rng)."""

import torch
import triton
import triton.language as tl


@triton.jit
def philox_uniform(position, seed):
    """fp32 uniform in [0, 1) for int64 stream ``position`` -- the same function as weightkit.ops.rng.uniform."""
    counter = position >> 2
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    lane = position & 3
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _stochastic_round_int8_kernel(x_ptr, inv_scale_ptr, out_ptr, n, group_size, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(inv_scale_ptr + idx // group_size, mask=mask, other=1.0)
    u = philox_uniform(idx + offset, seed)
    q = tl.floor(x * inv + u)  # launched with enable_fp_fusion=False: no fma, as in the reference
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(out_ptr + idx, q.to(tl.int8), mask=mask)


def stochastic_round_int8_triton(x, scale, group_size, seed, offset, block=1024):
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    inv_scale = 1.0 / scale  # IEEE division in torch; Triton's own fp32 division is approximate
    n = x.numel()
    grid = (triton.cdiv(n, block),)
    _stochastic_round_int8_kernel[grid](x, inv_scale, out, n, group_size, seed, offset, BLOCK=block,
                                        enable_fp_fusion=False)
    return out
