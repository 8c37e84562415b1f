"""Triton kernels of the INT8 ops (spec: weightkit.ops.int8, weightkit.ops.rng): stochastic rounding, the fused
dequantize + update + requantize of ``int8_sr_update_`` and the two kernels of ``int8_matmul`` (the GEMV and the
tensor-core GEMM; their design, configs and dispatch: kernels/_shared.py, "dequantize-and-multiply")."""

import torch
import triton
import triton.language as tl

from ._shared import (DequantMatmul, Launcher, cdiv, config, device_guard, gemv_accumulators, gemv_rows,
                      gemv_store_rows, gemv_tile, k_mask, launch, mm_tile, next_pow2, philox_uniform, philox_uniform4,
                      space, split_x_dot, store_result, unless_found, weight_dot, x_offsets)


@triton.jit
def _stochastic_round_int8_kernel(x_ptr, inv_scale_ptr, out_ptr, n, group_size, seed, offset, OFF3: tl.constexpr,
                                  ROWS: tl.constexpr):
    """A program covers 4 * ROWS consecutive stream positions starting at a multiple of 4 (element
    pid * 4 * ROWS - OFF3, OFF3 = offset % 4): one Philox evaluation per 4 elements."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * (4 * ROWS) - OFF3 + tl.arange(0, 4 * ROWS)
    mask = (idx >= 0) & (idx < n)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    inv = tl.load(inv_scale_ptr + idx // group_size, mask=mask, other=1.0)
    # counters as a tensor shift: (offset + 4 r) >> 2 = offset // 4 + r (the interpreter shifts an int64 scalar
    # argument as int32)
    u = philox_uniform4((offset + pid * (4 * ROWS) + 4 * tl.arange(0, ROWS)) >> 2, seed, 4 * ROWS)
    q = tl.floor(x * inv + u)  # launched with enable_fp_fusion=False: no fma, as in the reference
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(out_ptr + idx, q.to(tl.int8), mask=mask)


# Elementwise: the config only sets the work per program; the bucket is the element count rounded up to a power of 2.
_SR = Launcher(_stochastic_round_int8_kernel,
               space(lambda: [config(w, 1, ROWS=r) for r in (128, 256, 512, 1024) for w in (4, 8)],
                     config(4, 1, ROWS=64)), key=["n", "OFF3"])
stochastic_round_autotune = _SR.autotuner


def stochastic_round_int8_triton(x, scale, group_size, seed, offset):
    off3 = offset & 3
    n = x.numel()
    with device_guard(x.device):
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        inv_scale = 1.0 / scale  # IEEE division in torch; Triton's own fp32 division is approximate
        _SR.launch((n, off3, x.dtype, x.device), (x, inv_scale, out, n, group_size, seed, offset),
                   lambda: ((next_pow2(n), off3, x.dtype, x.device), lambda c: (cdiv(n + off3, 4 * c["ROWS"]),),
                            dict(OFF3=off3, enable_fp_fusion=False), None))
    return out


# -- int8_matmul (spec: weightkit.ops.int8.int8_matmul) ------------------------------------------------------------

TUNE_MIN_WEIGHT = 1 << 20  # weights with fewer elements use one fixed config: launch-bound, tuning would not pay


@triton.jit
def _i8_to_f32(q):
    """Exact int8 -> fp32 without the quarter-rate int-to-float conversion: the bits 0x4B000000 + (q + 128) are the
    float 2^23 + 128 + q."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit(do_not_specialize=["SPLIT_K"])
def _int8_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, p_ptr, c_ptr, M, N, K, G, stride_xm, stride_xk, SPLIT_K,
                      TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode: y[m, n] (m < M <= BLOCK_M <= 4) = sum over this split's k of x[m, k] B[k, n], no tensor cores.
    One 2-D fp32 accumulator per token (a 3-D [M, N, K] tile gets a layout that shuffles every step).
    EVEN_K: K % BLOCK_K == 0, no k masks."""
    pid_n, k_lo, k_hi, rn, rn64, mask_n, rk = gemv_tile(N, K, SPLIT_K, BLOCK_N, BLOCK_K)
    if TRANS:  # tiles [BLOCK_K, BLOCK_N] of W's rows k, contiguous along n
        w_ptrs = q_ptr + rk.to(tl.int64)[:, None] * N + rn64[None, :]
        w_step = BLOCK_K * tl.cast(N, tl.int64)
        s_ptrs = s_ptr + rk.to(tl.int64) * (N // G) + (pid_n * BLOCK_N) // G  # ALIGNED: one scale per k
        s_step = BLOCK_K * tl.cast(N // G, tl.int64)
    else:  # tiles [BLOCK_N, BLOCK_K] of W's rows n, contiguous along k
        w_ptrs = q_ptr + rn64[:, None] * K + rk[None, :]
        w_step = BLOCK_K
        s_ptrs = s_ptr + rn64 * (K // G) + k_lo // G  # ALIGNED: one scale per row n and step
        s_step = 0
    x_offs, x_step = x_offsets(rk, stride_xk, BLOCK_K)
    acc0, acc1, acc2, acc3 = gemv_accumulators(TRANS, BLOCK_N, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k_mask(rk, K, EVEN_K, BLOCK_K)
        if TRANS:
            wmask = mask_k[:, None] & mask_n[None, :]
        else:
            wmask = mask_n[:, None] & mask_k[None, :]
        w = _i8_to_f32(tl.load(w_ptrs, mask=wmask, other=0, eviction_policy="evict_first"))
        s_k = 1.0
        if ALIGNED:
            if TRANS:  # the N tile lies inside one group of each row: one scale per k, folded into x (fp32)
                s_k = tl.load(s_ptrs, mask=mask_k, other=0.0)
                s_ptrs += s_step
            else:  # the K step lies inside one group: one scale per row n
                w = w * tl.load(s_ptrs + k0 // G - k_lo // G, mask=mask_n, other=0.0)[:, None]
        else:  # scale gathered per element (flat index of W // G)
            rk_ = k0 + tl.arange(0, BLOCK_K)
            if TRANS:
                lin = rk_.to(tl.int64)[:, None] * N + rn64[None, :]
            else:
                lin = rn64[:, None] * K + rk_[None, :]
            w = w * tl.load(s_ptr + lin // G, mask=wmask, other=0.0)
        acc0, acc1, acc2, acc3 = gemv_rows(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, mask_k, w, s_k, TRANS,
                                            BLOCK_M)
        rk += BLOCK_K
        x_offs += x_step
        w_ptrs += w_step
    gemv_store_rows(y_ptr, p_ptr, c_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, TRANS, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _int8_mm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, p_ptr, c_ptr, M, N, K, G, stride_xm, stride_xk, SPLIT_K,
                    TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SCALE_AFTER_DOT: tl.constexpr, GROUP_M: tl.constexpr = 8,
                    DOT_F32: tl.constexpr = False, SPLIT_X: tl.constexpr = False):
    """Tensor cores: acc[n, m] += W'[n, k-tile] . x[m, k-tile]^T, W' dequantized in registers to x's dtype; SPLIT_X
    (a float32 x without TF32): q's exact values times x in three bf16 parts (split_x_dot), x scaled per k first
    where the groups run along N (TRANS); only with ALIGNED and (TRANS or SCALE_AFTER_DOT), as the launcher sets it."""
    pid_n, k_lo, k_hi, rm, rn, rn64, mask_m, mask_n, rk, x_ptrs = mm_tile(
        x_ptr, M, N, K, stride_xm, stride_xk, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    _, x_step = x_offsets(rk, stride_xk, BLOCK_K)
    if TRANS:  # element [n, k] = W[k, n]: contiguous along n (dim 0); groups run along n
        w_ptrs = q_ptr + rk.to(tl.int64)[None, :] * N + rn64[:, None]
        w_step = BLOCK_K * tl.cast(N, tl.int64)
        s_ptrs = s_ptr + rk.to(tl.int64) * (N // G) + (pid_n * BLOCK_N) // G  # ALIGNED: one scale per k
        s_step = BLOCK_K * tl.cast(N // G, tl.int64)
    else:  # element [n, k] = W[n, k]: contiguous along k
        w_ptrs = q_ptr + rn64[:, None] * K + rk[None, :]
        w_step = BLOCK_K
        s_ptrs = s_ptr + rn64 * (K // G) + k_lo // G  # ALIGNED: one scale per row n and step
        s_step = 0
    dt = x_ptr.dtype.element_ty
    if DOT_F32:  # the interpreter multiplies bf16 (stored as uint16) as integers: give it fp32 operands
        dt = tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = k_mask(rk, K, EVEN_K, BLOCK_K)
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_n[:, None] & mask_k[None, :]
        q = tl.load(w_ptrs, mask=wmask, other=0)
        if ALIGNED:
            if TRANS:  # one scale per k for the whole N tile
                s = tl.load(s_ptrs, mask=mask_k, other=0.0)[None, :]
                s_ptrs += s_step
            else:  # one scale per row n for the whole K step
                s = tl.load(s_ptrs + k0 // G - k_lo // G, mask=mask_n, other=0.0)[:, None]
        else:  # scale gathered per element (flat index of W // G)
            if TRANS:
                lin = rk.to(tl.int64)[None, :] * N + rn64[:, None]
            else:
                lin = rn64[:, None] * K + rk[None, :]
            s = tl.load(s_ptr + lin // G, mask=wmask, other=0.0)
        if SPLIT_X:  # s: [1, BLOCK_K] (TRANS, folded into x) or [BLOCK_N, 1] (scaled after the dot)
            acc = split_x_dot(acc, q, xt * s if TRANS else xt, s, not DOT_F32, not TRANS)
        else:  # SCALE_AFTER_DOT only with ALIGNED and not TRANS (s is [BLOCK_N, 1]): q is exact in x's dtype
            acc = weight_dot(acc, q if SCALE_AFTER_DOT else _i8_to_f32(q) * s, xt, s, dt, PRECISION,
                             SCALE_AFTER_DOT)
        rk += BLOCK_K
        x_ptrs += x_step
        w_ptrs += w_step
    store_result(y_ptr, p_ptr, c_ptr, acc, rm, rn, M, N, SPLIT_K)


_MATMUL = DequantMatmul(_int8_gemv_kernel, _int8_mm_kernel, 8, lambda: TUNE_MIN_WEIGHT)
# The autotuners (module-level: bench/gpu_report.py prints the configs they chose).
int8_gemv_autotune, int8_gemv_t_autotune, int8_mm_autotune, int8_mm_t_autotune = _MATMUL.autotuners()


def int8_matmul_triton(x, w_q, scale, group_size, transpose):
    """y = x @ dequant(w_q)^T (or x @ dequant(w_q) with ``transpose``) for a 2-D x (any strides)."""
    out_f, in_f = w_q.shape
    n, k = (in_f, out_f) if transpose else (out_f, in_f)
    with device_guard(x.device):
        y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        return _MATMUL(x, (w_q, scale), y, n, k, group_size, bool(transpose), aligned=True)


# -- int8_sr_update_ (spec: weightkit.ops.int8.int8_sr_update_) ----------------------------------------------------

@triton.jit
def _int8_sr_update_kernel(q_ptr, scale_ptr, delta_ptr, found_ptr, group_size, decay, seed, offset,
                           HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """General case, one program per group: w = (q * s + delta) * decay, s' = max(max|w| / 127, FLT_MIN),
    q' = SR(w / s'); one Philox evaluation per element (any group size and offset). HAS_FOUND: nothing is stored
    where the step's flag (found_ptr) is set."""
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
    tl.store(q_ptr + idx, v.to(tl.int8), mask=unless_found(mask, found_ptr, HAS_FOUND))
    tl.store(scale_ptr + g, ns, mask=unless_found(g >= 0, found_ptr, HAS_FOUND))


@triton.jit
def _int8_sr_update_tiled_kernel(q_ptr, scale_ptr, delta_ptr, found_ptr, n_groups, decay, seed, offset,
                                 HAS_FOUND: tl.constexpr, GS: tl.constexpr, G: tl.constexpr):
    """Fast case (group size a power of two >= 4, offset % 4 == 0): G groups per program as a [G, GS] tile, whose
    G * GS stream positions start at a multiple of 4: one Philox evaluation per 4 elements."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * G + tl.arange(0, G)
    rmask = rows < n_groups
    cols = tl.arange(0, GS)
    idx = rows[:, None] * GS + cols[None, :]
    mask = rmask[:, None] & (cols[None, :] < GS)
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32)
    d = tl.load(delta_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rows, mask=rmask, other=1.0)
    w = (q * s[:, None] + d) * decay
    amax = tl.max(tl.abs(w), axis=1)
    ns = tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)
    inv = tl.math.div_rn(tl.full([G], 1.0, tl.float32), ns)
    u = philox_uniform4((offset + pid * (G * GS) + 4 * tl.arange(0, G * GS // 4)) >> 2, seed, G * GS)
    v = tl.floor(w * inv[:, None] + tl.reshape(u, (G, GS)))
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    tl.store(q_ptr + idx, v.to(tl.int8), mask=unless_found(mask, found_ptr, HAS_FOUND))
    tl.store(scale_ptr + rows, ns, mask=unless_found(rmask, found_ptr, HAS_FOUND))


def _sr_update_prune(configs, named_args, **kwargs):
    gs = named_args["GS"] if "GS" in named_args else kwargs.get("GS", 128)
    kept = [c for c in configs if 256 <= c.kwargs["G"] * gs <= 8192]
    return kept or configs[:1]


_SR_UPDATE = Launcher(_int8_sr_update_tiled_kernel,
                      space(lambda: [config(w, 1, G=g) for g in (2, 4, 8, 16, 32) for w in (4, 8)], config(4, 1, G=2)),
                      key=["n_groups", "GS"], prune=_sr_update_prune, restore_value=["q_ptr", "scale_ptr"])
sr_update_autotune = _SR_UPDATE.autotuner


def int8_sr_update_triton(w_q, scale, delta, group_size, decay, seed, offset, found_inf=None):
    groups = scale.numel()
    has_found = found_inf is not None
    flag = found_inf if has_found else scale  # an unused pointer without a flag
    with device_guard(w_q.device):
        if group_size >= 4 and group_size & (group_size - 1) == 0 and offset % 4 == 0:
            bucket = (next_pow2(groups), group_size, delta.dtype, w_q.device, has_found)
            _SR_UPDATE.launch((groups,) + bucket[1:], (w_q, scale, delta, flag, groups, float(decay), seed, offset),
                              lambda: (bucket, lambda c: (cdiv(groups, c["G"]),),
                                       dict(GS=group_size, HAS_FOUND=has_found, enable_fp_fusion=False), None))
            return
        launch(_int8_sr_update_kernel, (groups,), w_q, scale, delta, flag, group_size, float(decay), seed, offset,
               HAS_FOUND=has_found, BLOCK=next_pow2(group_size), enable_fp_fusion=False)
