"""Triton kernels for INT4 matrices (spec: weightkit.ops.int4). Divisions use ``div_rn`` (IEEE, like torch) and
rounding half to even uses the 1.5 * 2^23 trick (exact for |v| < 2^22; larger values are clamped anyway), so the
results match the reference bit for bit. Launched with enable_fp_fusion=False (no fma)."""

import torch
import triton
import triton.language as tl

_FLT_MIN = 1.1754943508222875e-38
_ROUND = 12582912.0  # 1.5 * 2^23: (v + _ROUND) - _ROUND rounds v to the nearest integer, ties to even


@triton.jit
def _rint(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quantize_int4_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, group_size, HALF: tl.constexpr):
    """One program per group; lane i handles elements 2i and 2i+1 (one output byte)."""
    g = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    mask = i < group_size // 2
    base = g * group_size
    a = tl.load(x_ptr + base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    lo = tl.minimum(tl.min(tl.minimum(a, b), axis=0), 0.0)  # masked lanes hold 0, inside [lo, hi] already
    hi = tl.maximum(tl.max(tl.maximum(a, b), axis=0), 0.0)
    s = tl.maximum(tl.math.div_rn(hi - lo, 15.0), 1.1754943508222875e-38)
    z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), 15.0)
    qa = tl.minimum(tl.maximum(_rint(tl.math.div_rn(a, s) + z), 0.0), 15.0).to(tl.uint8)
    qb = tl.minimum(tl.maximum(_rint(tl.math.div_rn(b, s) + z), 0.0), 15.0).to(tl.uint8)
    tl.store(packed_ptr + g * (group_size // 2) + i, qa | (qb << 4), mask=mask)
    tl.store(scale_ptr + g, s)
    tl.store(zero_ptr + g, z.to(tl.uint8))


def quantize_int4_triton(x, group_size):
    n = x.numel()
    groups = n // group_size
    packed = torch.empty(n // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    zero = torch.empty(groups, dtype=torch.uint8, device=x.device)
    half = triton.next_power_of_2(max(group_size // 2, 1))
    _quantize_int4_kernel[(groups,)](x, packed, scale, zero, group_size, HALF=half, enable_fp_fusion=False)
    return packed, scale, zero


@triton.jit
def _dequant(packed_ptr, scale_ptr, zero_ptr, lin, group_size, mask):
    """float32 values of the INT4 matrix at flat indices ``lin`` (int64)."""
    byte = tl.load(packed_ptr + (lin >> 1), mask=mask, other=0).to(tl.int32)
    q = ((byte >> ((lin & 1) * 4).to(tl.int32)) & 0xF).to(tl.float32)
    grp = lin // group_size
    s = tl.load(scale_ptr + grp, mask=mask, other=0.0)
    z = tl.load(zero_ptr + grp, mask=mask, other=0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _dequantize_int4_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, n, group_size, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(out_ptr + idx, _dequant(packed_ptr, scale_ptr, zero_ptr, idx, group_size, mask), mask=mask)


def dequantize_int4_triton(packed, scale, zero, group_size, block=1024):
    n = packed.numel() * 2
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    _dequantize_int4_kernel[(triton.cdiv(n, block),)](packed, scale, zero, out, n, group_size, BLOCK=block,
                                                       enable_fp_fusion=False)
    return out


@triton.jit
def _int4_matmul_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, T, N, K, group_size, stride_xt, stride_xk,
                        stride_bk, stride_bn, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y (T x N) = x (T x K) @ B (K x N), B[k, n] = W_flat[k * stride_bk + n * stride_bn] dequantized in registers."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_xt + rk[None, :].to(tl.int64) * stride_xk,
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0).to(tl.float32)
        lin = rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        b = _dequant(packed_ptr, scale_ptr, zero_ptr, lin, group_size, (rk[:, None] < K) & (rn[None, :] < N))
        acc += tl.dot(x, b, input_precision="ieee")
    tl.store(y_ptr + rt[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rt[:, None] < T) & (rn[None, :] < N))


def int4_matmul_triton(x, packed, scale, zero, group_size, rows, cols, transpose, block_t=32, block_n=32,
                       block_k=32):
    tokens = x.shape[0]
    if transpose:  # y = x W: K = rows, N = cols, B[k, n] = W[k, n]
        n_out, k_dim, stride_bk, stride_bn = cols, rows, cols, 1
    else:  # y = x W^T: K = cols, N = rows, B[k, n] = W[n, k]
        n_out, k_dim, stride_bk, stride_bn = rows, cols, 1, cols
    y = torch.empty((tokens, n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(n_out, block_n))
    _int4_matmul_kernel[grid](x, packed, scale, zero, y, tokens, n_out, k_dim, group_size, x.stride(0), x.stride(1),
                              stride_bk, stride_bn, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                              enable_fp_fusion=False)
    return y
