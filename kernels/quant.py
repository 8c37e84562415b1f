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


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, T, N, K, group_size, stride_xt, stride_xk, stride_bk, stride_bn,
                        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (T x N) = x (T x K) @ B (K x N), B[k, n] = q[k*stride_bk + n*stride_bn] * s[(same index) // group_size]:
    the int8 weight is dequantized tile by tile in registers."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rt[:, None] * stride_xt + rk[None, :] * stride_xk,
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0).to(tl.float32)
        lin = rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        b_mask = (rk[:, None] < K) & (rn[None, :] < N)
        q = tl.load(q_ptr + lin, mask=b_mask, other=0).to(tl.float32)
        s = tl.load(s_ptr + lin // group_size, mask=b_mask, other=0.0)
        acc += tl.dot(x, q * s, input_precision="ieee")
    tl.store(y_ptr + rt[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rt[:, None] < T) & (rn[None, :] < N))


def int8_matmul_triton(x, w_q, scale, group_size, transpose, block_t=32, block_n=32, block_k=32):
    out_f, in_f = w_q.shape
    tokens = x.shape[0]
    if transpose:  # y = x W: K = out rows, N = in columns, B[k, n] = W[k, n]
        n_out, k_dim, stride_bk, stride_bn = in_f, out_f, in_f, 1
    else:  # y = x W^T: K = in, N = out, B[k, n] = W[n, k]
        n_out, k_dim, stride_bk, stride_bn = out_f, in_f, 1, in_f
    y = torch.empty((tokens, n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(n_out, block_n))
    _int8_matmul_kernel[grid](x, w_q, scale, y, tokens, n_out, k_dim, group_size, x.stride(0), x.stride(1),
                              stride_bk, stride_bn, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


@triton.jit
def _int8_sr_update_kernel(q_ptr, scale_ptr, delta_ptr, group_size, decay, seed, offset, BLOCK: tl.constexpr):
    """One program per group: w = (q * s + delta) * decay, s' = max(max|w| / 127, FLT_MIN), q' = SR(w / s')."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < group_size
    idx = g * group_size + i
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32)
    d = tl.load(delta_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + g)
    w = (q * s + d) * decay
    amax = tl.max(tl.where(mask, tl.abs(w), 0.0), axis=0)
    ns = tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)
    inv = tl.math.div_rn(1.0, ns)
    u = philox_uniform(idx + offset, seed)
    v = tl.floor(w * inv + u)
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    tl.store(q_ptr + idx, v.to(tl.int8), mask=mask)
    tl.store(scale_ptr + g, ns)


def int8_sr_update_triton(w_q, scale, delta, group_size, decay, seed, offset):
    groups = scale.numel()
    block = triton.next_power_of_2(group_size)
    _int8_sr_update_kernel[(groups,)](w_q, scale, delta, group_size, float(decay), seed, offset, BLOCK=block,
                                      enable_fp_fusion=False)
