"""Triton kernels for INT4 matrices (spec: weightkit.ops.int4). Divisions use ``div_rn`` (IEEE, like torch) and
rounding half to even uses the 1.5 * 2^23 trick (exact for |v| < 2^22; larger values are clamped anyway), so the
results match the reference bit for bit. Launched with enable_fp_fusion=False (no fma)."""

import torch
import triton
import triton.language as tl

from ._shared import (DequantMatmul, Launcher, cdiv, config, dequant_int4, device_guard, dot3, gemv_accumulators,
                      gemv_rows, gemv_store_rows, gemv_tile, k_mask, launch, mm_tile, next_pow2, space,
                      split_x_dot, store_result, unpack_int4_f32, weight_dot, x_offsets)

TUNE_MIN_WEIGHT = 1 << 20  # weights with fewer elements use one fixed config: launch-bound, tuning would not pay

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


@triton.jit
def _quantize_int4_tiled_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, n_groups, GS: tl.constexpr, G: tl.constexpr):
    """Bandwidth case (group size a power of two >= 2): G groups per program as one [G, GS] tile, loaded contiguous
    (16-byte loads), min/max per row, and the even/odd elements of each row split in registers into one byte each
    (the general kernel above loads stride-2 halves, one group per program, a quarter of its lanes idle at g64)."""
    rows = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    rmask = rows < n_groups
    x = tl.load(x_ptr + rows[:, None] * GS + tl.arange(0, GS)[None, :], mask=rmask[:, None], other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    lo = tl.minimum(tl.min(x, axis=1), 0.0)  # masked rows hold zeros: their scale and zero are not stored
    hi = tl.maximum(tl.max(x, axis=1), 0.0)
    s = tl.maximum(tl.math.div_rn(hi - lo, tl.full([G], 15.0, tl.float32)), 1.1754943508222875e-38)
    z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), 15.0)
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s[:, None]) + z[:, None]), 0.0), 15.0).to(tl.uint8)
    even, odd = tl.split(tl.reshape(q, (G, GS // 2, 2)))
    tl.store(packed_ptr + rows[:, None] * (GS // 2) + tl.arange(0, GS // 2)[None, :], even | (odd << 4),
             mask=rmask[:, None])
    tl.store(scale_ptr + rows, s, mask=rmask)
    tl.store(zero_ptr + rows, z.to(tl.uint8), mask=rmask)


def _quantize_prune(configs, named_args, **kwargs):
    gs = kwargs.get("GS", named_args.get("GS", 64))
    kept = [c for c in configs if 512 <= c.kwargs["G"] * gs <= 16384]
    return kept or configs[:1]


# Tiles of 512-16384 elements (2-64 KB of fp32 read per program), 4 or 8 warps; tuned once per (group count
# rounded up to a power of two, group size, dtype): bandwidth-bound, so the tile only sets the bytes in flight.
_QUANTIZE = Launcher(_quantize_int4_tiled_kernel,
                     space(lambda: [config(w, 1, G=g) for g in (4, 8, 16, 32, 64, 128, 256) for w in (4, 8)],
                           config(4, 1, G=4)),
                     key=["n_groups", "GS"], prune=_quantize_prune)
quantize_autotune = _QUANTIZE.autotuner


def quantize_int4_triton(x, group_size):
    n = x.numel()
    groups = n // group_size
    with device_guard(x.device):
        packed = torch.empty(n // 2, dtype=torch.uint8, device=x.device)
        scale = torch.empty(groups, dtype=torch.float32, device=x.device)
        zero = torch.empty(groups, dtype=torch.uint8, device=x.device)
        if groups and group_size & (group_size - 1) == 0:
            bucket = (next_pow2(groups), group_size, x.dtype, x.device)
            _QUANTIZE.launch((groups,) + bucket[1:], (x, packed, scale, zero, groups),
                             lambda: (bucket, lambda c: (cdiv(groups, c["G"]),),
                                      dict(GS=group_size, enable_fp_fusion=False), None))
            return packed, scale, zero
        half = next_pow2(max(group_size // 2, 1))
        _quantize_int4_kernel[(groups,)](x, packed, scale, zero, group_size, HALF=half, enable_fp_fusion=False)
    return packed, scale, zero


@triton.jit
def _dequantize_int4_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, n, group_size, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(out_ptr + idx, dequant_int4(packed_ptr, scale_ptr, zero_ptr, idx, group_size, mask), mask=mask)


def dequantize_int4_triton(packed, scale, zero, group_size, block=1024):
    n = packed.numel() * 2
    with device_guard(packed.device):
        out = torch.empty(n, dtype=torch.float32, device=packed.device)
        launch(_dequantize_int4_kernel, (cdiv(n, block),), packed, scale, zero, out, n, group_size, BLOCK=block,
               enable_fp_fusion=False)
    return out


# -- int4_matmul (spec: weightkit.ops.int4.int4_matmul) ------------------------------------------------------------
# The same two kernels as int8_matmul (design, configs, split-K and dispatch: kernels/_shared.py,
# "dequantize-and-multiply"), with the
# weight read as packed bytes: a tile of C values along W's contiguous axis is C/2 bytes (16-byte loads), unpacked
# in registers (low nibble = even element) with tl.join + reshape. Dequantization (q - z) * s is exact to the
# reference: q + 2^23 is built from the bits (no int-to-float conversion), minus (z + 2^23) gives q - z exactly.
# ALIGNED needs the groups inside rows (cols % G == 0); otherwise (odd shapes) each element is gathered from its flat
# index with _dequant, like the reference.


@triton.jit(do_not_specialize=["SPLIT_K"])
def _int4_gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, row_bytes, y_ptr, p_ptr, c_ptr, M, N, K, G, stride_xm,
                      stride_xk, SPLIT_K, TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode (M <= BLOCK_M <= 4), no tensor cores; see _int8_gemv_kernel. W is rows x cols; B[k, n] = W[n, k]
    (K = cols) or, with TRANS, W[k, n] (K = rows)."""
    pid_n, k_lo, k_hi, rn, rn64, mask_n, rk = gemv_tile(N, K, SPLIT_K, BLOCK_N, BLOCK_K)
    if TRANS:  # tiles [BLOCK_K, BLOCK_N]: BLOCK_N / 2 bytes of each row k; ALIGNED: one group per row and tile
        b_ptrs = packed_ptr + rk.to(tl.int64)[:, None] * row_bytes + ((pid_n * BLOCK_N) // 2 +
                                                                    tl.arange(0, BLOCK_N // 2))[None, :]
        b_step = BLOCK_K * tl.cast(row_bytes, tl.int64)
        grp = rk.to(tl.int64) * (N // G) + (pid_n * BLOCK_N) // G
        g_step = BLOCK_K * tl.cast(N // G, tl.int64)
    else:  # tiles [BLOCK_N, BLOCK_K]: BLOCK_K / 2 bytes of each row n; ALIGNED: one group per row and step
        b_ptrs = packed_ptr + rn64[:, None] * row_bytes + (k_lo // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
        b_step = BLOCK_K // 2
        grp = rn64 * (K // G)  # + k0 // G in the loop (BLOCK_K divides G)
        g_step = 0
    x_offs, x_step = x_offsets(rk, stride_xk, BLOCK_K)
    acc0, acc1, acc2, acc3 = gemv_accumulators(TRANS, BLOCK_N, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k_mask(rk, K, EVEN_K, BLOCK_K)
        s_k = 1.0
        if ALIGNED:
            if TRANS:  # one (scale, zero) per k, the scale folded into x (fp32)
                b = tl.load(b_ptrs, mask=mask_k[:, None], other=0, eviction_policy="evict_first")
                s_k = tl.load(scale_ptr + grp, mask=mask_k, other=0.0)
                c = tl.load(zero_ptr + grp, mask=mask_k, other=0).to(tl.float32) + 8388608.0
                w = unpack_int4_f32(b, BLOCK_K, BLOCK_N) - c[:, None]
            else:  # one (scale, zero) per row n
                b = tl.load(b_ptrs, mask=mask_n[:, None], other=0, eviction_policy="evict_first")
                s = tl.load(scale_ptr + grp + k0 // G, mask=mask_n, other=0.0)
                c = tl.load(zero_ptr + grp + k0 // G, mask=mask_n, other=0).to(tl.float32) + 8388608.0
                w = (unpack_int4_f32(b, BLOCK_N, BLOCK_K) - c[:, None]) * s[:, None]
            b_ptrs += b_step
            grp += g_step
        else:  # any layout: every element from its flat index, like the reference
            if TRANS:
                lin = rk.to(tl.int64)[:, None] * N + rn64[None, :]
                wmask = mask_k[:, None] & mask_n[None, :]
            else:
                lin = rn64[:, None] * K + rk[None, :]
                wmask = mask_n[:, None] & mask_k[None, :]
            w = dequant_int4(packed_ptr, scale_ptr, zero_ptr, lin, G, wmask)
        acc0, acc1, acc2, acc3 = gemv_rows(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, mask_k, w, s_k, TRANS,
                                            BLOCK_M)
        rk += BLOCK_K
        x_offs += x_step
    gemv_store_rows(y_ptr, p_ptr, c_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, TRANS, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _int4_mm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, row_bytes, y_ptr, p_ptr, c_ptr, M, N, K, G, stride_xm,
                    stride_xk, SPLIT_K, TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SCALE_AFTER_DOT: tl.constexpr, GROUP_M: tl.constexpr = 8,
                    DOT_F32: tl.constexpr = False, SPLIT3: tl.constexpr = False, SPLIT_X: tl.constexpr = False):
    """Tensor cores: acc[n, m] += W'[n, k-tile] . x[m, k-tile]^T; see _int8_mm_kernel. SPLIT3 (a 16-bit x with a
    float32 result, int4_matmul's out_dtype=float32): where the weight tile is scaled before the dot (not
    SCALE_AFTER_DOT: transposed, or groups no K step divides), its float32 values are split in three bf16 parts for
    three products with x's exact values (dot3; an fp16 x, itself split in two bf16 parts: five): float32 accuracy,
    W never rounded to x's dtype. SPLIT_X (a float32 x without TF32): the weight's integers q - z times x in three
    bf16 parts (split_x_dot), x scaled per k first where the groups run along N (TRANS); only with ALIGNED and
    (TRANS or SCALE_AFTER_DOT), as the launcher sets it."""
    pid_n, k_lo, k_hi, rm, rn, rn64, mask_m, mask_n, rk, x_ptrs = mm_tile(
        x_ptr, M, N, K, stride_xm, stride_xk, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    _, x_step = x_offsets(rk, stride_xk, BLOCK_K)
    if TRANS:  # byte tiles [BLOCK_K, BLOCK_N // 2] of rows k; ALIGNED: one group per row and tile
        b_ptrs = packed_ptr + rk.to(tl.int64)[:, None] * row_bytes + ((pid_n * BLOCK_N) // 2 +
                                                                    tl.arange(0, BLOCK_N // 2))[None, :]
        b_step = BLOCK_K * tl.cast(row_bytes, tl.int64)
        grp = rk.to(tl.int64) * (N // G) + (pid_n * BLOCK_N) // G
        g_step = BLOCK_K * tl.cast(N // G, tl.int64)
    else:  # byte tiles [BLOCK_N, BLOCK_K // 2] of rows n; ALIGNED: one group per row and step
        b_ptrs = packed_ptr + rn64[:, None] * row_bytes + (k_lo // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
        b_step = BLOCK_K // 2
        grp = rn64 * (K // G)  # + k0 // G in the loop (BLOCK_K divides G)
        g_step = 0
    dt = x_ptr.dtype.element_ty
    if DOT_F32:  # the interpreter multiplies bf16 (stored as uint16) as integers: give it fp32 operands
        dt = tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k_mask(rk, K, EVEN_K, BLOCK_K)
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if ALIGNED:
            if TRANS:
                b = tl.load(b_ptrs, mask=mask_k[:, None], other=0)
                s = tl.load(scale_ptr + grp, mask=mask_k, other=0.0)
                c = tl.load(zero_ptr + grp, mask=mask_k, other=0).to(tl.float32) + 8388608.0
                w = unpack_int4_f32(b, BLOCK_K, BLOCK_N) - c[:, None]  # q - z, exact
                if not SPLIT_X:  # (SPLIT_X: the scales go into x)
                    w = w * s[:, None]
                w = tl.trans(w)
            else:
                b = tl.load(b_ptrs, mask=mask_n[:, None], other=0)
                s = tl.load(scale_ptr + grp + k0 // G, mask=mask_n, other=0.0)[:, None]
                c = tl.load(zero_ptr + grp + k0 // G, mask=mask_n, other=0).to(tl.float32) + 8388608.0
                w = unpack_int4_f32(b, BLOCK_N, BLOCK_K) - c[:, None]  # q - z, exact
                if not SCALE_AFTER_DOT:
                    w = w * s
            b_ptrs += b_step
            grp += g_step
        else:  # any layout: every element from its flat index, like the reference
            if TRANS:
                lin = rk.to(tl.int64)[None, :] * N + rn64[:, None]
            else:
                lin = rn64[:, None] * K + rk[None, :]
            w = dequant_int4(packed_ptr, scale_ptr, zero_ptr, lin, G, mask_n[:, None] & mask_k[None, :])
            s = 1.0  # the scales are in w
        # SCALE_AFTER_DOT only with ALIGNED and not TRANS: (q - z) is exact in x's dtype
        if SPLIT_X:  # w: q - z; s: [BLOCK_K] (TRANS, folded into x) or [BLOCK_N, 1] (scaled after the dot)
            acc = split_x_dot(acc, w, xt * s[None, :] if TRANS else xt, s, not DOT_F32, not TRANS)
        elif SPLIT3 and not SCALE_AFTER_DOT:  # w: float32 values (q - z) * s
            acc += dot3(w, tl.trans(xt), not DOT_F32, True, x_ptr.dtype.element_ty == tl.float16)
        else:
            acc = weight_dot(acc, w, xt, s, dt, PRECISION, SCALE_AFTER_DOT)
        rk += BLOCK_K
        x_ptrs += x_step
    store_result(y_ptr, p_ptr, c_ptr, acc, rm, rn, M, N, SPLIT_K)


_MATMUL = DequantMatmul(_int4_gemv_kernel, _int4_mm_kernel, 4, lambda: TUNE_MIN_WEIGHT)
# The autotuners (module-level: bench/gpu_report.py prints the configs they chose).
int4_gemv_autotune, int4_gemv_t_autotune, int4_mm_autotune, int4_mm_t_autotune = _MATMUL.autotuners()


def int4_matmul_triton(x, packed, scale, zero, group_size, rows, cols, transpose, out_dtype=None):
    """y = x @ W^T (or x @ W with ``transpose``) for the INT4 matrix W (rows x cols) and a 2-D x (any strides), in x's
    dtype or ``out_dtype`` (the fp32 accumulators stored as such: int4_matmul's out_dtype=float32 on the triton
    backend, weightkit/backends/triton/int4.py)."""
    n, k = (cols, rows) if transpose else (rows, cols)
    with device_guard(x.device):
        y = torch.empty((x.shape[0], n), dtype=out_dtype or x.dtype, device=x.device)
        # row_bytes = cols // 2, an argument of its own: Triton knows it divisible by 16 when it is (cols % 32 == 0), so
        # the packed rows load with 16-byte vectors (from K // 2 it would only know 8)
        return _MATMUL(x, (packed, scale, zero, cols // 2), y, n, k, group_size, bool(transpose),
                       aligned=cols % group_size == 0)
