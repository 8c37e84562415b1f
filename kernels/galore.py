"""Triton kernels of the fused GaLore Adam step (spec: weightkit.ops.galore).

1. ``_low_rank_adam_kernel``: M, V updated in place and U = M / (sqrt(V) + eps), one pass over the low-rank tensors,
   U written in the basis' dtype (float32, or bfloat16 / float16 for a basis stored in proj_dtype, so that the
   projection back runs on 16-bit tensor cores).
2. ``_matmul_update_kernel``: W <- decay W + alpha (A @ B) tile by tile; the product is never stored, and the weight
   is read and written once in its own dtype (float32, bfloat16, float16) with fp32 accumulation. Alone, for a U
   computed elsewhere (8-bit moments in one pass): ``lowrank_update_triton`` (weightkit.ops.galore.lowrank_update_).

Both take the step's non-finite flag (``found_inf``, a one-element float32 tensor: nonzero = a gradient of this
step held NaN/Inf): where it is set they leave M, V and W unchanged, so that ``nonfinite='skip'`` needs no host
sync; and optionally the step size as a one-element float32 tensor (Adam's bias correction counted on the device,
when skipped steps are not known on the host).

Precision (``PRECISION``, a constexpr) of the matmul: for a float32 basis, ``"tf32"`` only when the user allows TF32
(weightkit.ops.galore.matmul_precision), else ``"bf16x6"``: float32 accuracy from six bf16 tensor-core products of
the operands' three-part bf16 splits (_shared.dot6), in place of ``"ieee"``'s strict-fp32 dot on the FMA units
(which stays for comparison: ``precision="ieee"``); for a 16-bit basis ``"bf16"`` / ``"fp16"`` (16-bit operands,
fp32 accumulation). The
matmul's tiles are autotuned per (M, N, K, precision, weight dtype) on a GPU over a space sized for H100/H200
(shared memory <= 160 KB per program); under TRITON_INTERPRET=1 one config, and 16-bit operands upcast to fp32
before the dot (the 3.9 interpreter's bf16 dot returns garbage; the products are the same, exact in fp32). Row
offsets are int64: rows * stride passes 2^31 for weights above 2^31 elements.
"""

import torch
import triton
import triton.language as tl

from ._shared import (INTERPRET, TUNE_LOCK, Launcher, capturing, cdiv, config, device_guard, dot6, launch, next_pow2,
                      round_bf16, space, tile_ids, tune_bench)


@triton.jit
def _low_rank_adam_kernel(r_ptr, m_ptr, v_ptr, u_ptr, found_ptr, n, beta1, beta2, eps, HAS_FOUND: tl.constexpr,
                          BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(r_ptr + idx, mask=mask, other=0.0)
    m_old = tl.load(m_ptr + idx, mask=mask, other=0.0)
    v_old = tl.load(v_ptr + idx, mask=mask, other=0.0)
    m = m_old * beta1 + (1.0 - beta1) * g
    v = v_old * beta2 + (1.0 - beta2) * g * g
    u = m / (tl.sqrt_rn(v) + eps)
    if HAS_FOUND:
        skip = tl.load(found_ptr) != 0.0
        m = tl.where(skip, m_old, m)
        v = tl.where(skip, v_old, v)
        u = tl.where(skip, 0.0, u)
    tl.store(m_ptr + idx, m, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)
    tl.store(u_ptr + idx, u.to(u_ptr.dtype.element_ty), mask=mask)


def _matmul_configs():
    if INTERPRET:  # the interpreter would benchmark every config in numpy
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4,
                              num_stages=1)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 128-256 wide output tiles for the large weights (a 4096^2 weight
    # is 256-1024 programs on 132 SMs), 64-wide ones for small or thin weights; K tiles 32-64 (K = rank, often
    # 128-1024). fp32 operands at 128x128x32 x 4 stages take 128 KB of shared memory, within an H100/H200's 227 KB.
    shapes = [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3),
              (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune_matmul_configs(configs, named_args, **kwargs):
    """The 128 x 256 tiles (128 accumulators a thread on 8 warps) only where the epilogue is light: 16-bit operands
    and weights. With float32 operands or weights their sm_90 compiles spilled 0.1-1.4 KB a thread (Triton 3.6; on 16
    warps, capped at 128 registers, still 0.1-0.8 KB); the 128 x 128 tiles do not spill."""
    light = kwargs.get("W_DTYPE") != str(torch.float32) and kwargs.get("PRECISION") in ("bf16", "fp16")
    keep = [c for c in configs if light or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    return keep or configs


@triton.autotune(configs=_matmul_configs(), key=["M", "N", "K", "PRECISION", "W_DTYPE"], restore_value=["w_ptr"],
                 prune_configs_by={"early_config_prune": _prune_matmul_configs}, do_bench=tune_bench)
@triton.jit
def _matmul_update_kernel(a_ptr, b_ptr, w_ptr, found_ptr, step_ptr, M, N, K, stride_am, stride_ak, stride_bk,
                          stride_bn, stride_wm, stride_wn, alpha, decay, HAS_FOUND: tl.constexpr,
                          HAS_STEP: tl.constexpr, PRECISION: tl.constexpr, W_DTYPE: tl.constexpr,
                          UPCAST_16BIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)  # grouped order: column blocks of B reused from L2
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST_16BIT and (PRECISION == "bf16" or PRECISION == "fp16"):
            # the interpreter's 16-bit dot is wrong (Triton 3.9): the same products, exact in fp32, fp32 sums
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee", out_dtype=tl.float32)
        elif PRECISION == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc, out_dtype=tl.float32)
        elif PRECISION == "fp16":
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc=acc, out_dtype=tl.float32)
        elif PRECISION == "bf16x6":  # float32 operands, float32 accuracy from six bf16 tensor-core products
            acc += dot6(a, b, TC_BF16=not UPCAST_16BIT)
        elif PRECISION == "tf32":
            acc = tl.dot(a, b, acc=acc, input_precision="tf32", out_dtype=tl.float32)
        else:
            acc = tl.dot(a, b, acc=acc, input_precision="ieee", out_dtype=tl.float32)
    if HAS_STEP:  # alpha = -step_size * scale * decay with the step size read on the device
        alpha = alpha * tl.load(step_ptr)
    w_mask = (rm[:, None] < M) & (rn[None, :] < N)
    w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    new = w * decay + alpha * acc
    if HAS_FOUND:
        new = tl.where(tl.load(found_ptr) != 0.0, w, new)
    tl.store(w_ptrs, new.to(w_ptr.dtype.element_ty), mask=w_mask)


_PRECISION_OF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# The matmul's config per tuning key (its autotuner's key: the key arguments and the tensors' dtypes), tuned by the
# key's first call outside a CUDA-graph capture; later calls launch it through a cached plan (_shared.launch: direct
# launches, no autotuner on the call path). A key's first call inside a capture must not tune (the autotuner's timing
# synchronizes the capturing stream, which invalidates the capture): it launches the first config untimed (128 x 128
# x 32, which every pruning keeps) and records nothing, so the key's first eager call tunes.
_TUNED = {}


def _matmul_precision(ortho, tf32, precision):
    """The matmul's PRECISION for ``ortho``'s dtype: float32, 'bf16x6' (or 'tf32' when ``tf32``; 'ieee': strict-fp32
    FMA dots, kept to measure against); a 16-bit ortho, its dtype's products."""
    if ortho.dtype == torch.float32:
        precision = precision or ("tf32" if tf32 else "bf16x6")
        if precision not in ("ieee", "tf32", "bf16x6"):
            raise ValueError(f"precision must be 'ieee', 'tf32' or 'bf16x6' for a float32 ortho, got {precision!r}")
        return precision
    if precision not in (None, _PRECISION_OF.get(ortho.dtype)):
        raise ValueError(f"a {ortho.dtype} ortho runs its own dtype's products, got precision={precision!r}")
    return _PRECISION_OF.get(ortho.dtype, "ieee")


def galore_adam_update_triton(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
                              decay, found_inf=None, step_size_t=None, tf32=False, block=1024, precision=None):
    """``ortho`` float32 (the matmul runs bf16x6, or tf32 when ``tf32``; ``precision="ieee"``: strict-fp32 FMA dots,
    kept to measure against) or bfloat16 / float16 (U is written in that dtype and the matmul runs on 16-bit operands
    with fp32 accumulation). Launches on the weight's device."""
    precision = _matmul_precision(ortho, tf32, precision)
    with device_guard(weight.device):
        update = torch.empty(low_grad.shape, dtype=ortho.dtype, device=low_grad.device)
        n = low_grad.numel()
        flag = found_inf if found_inf is not None else exp_avg  # an unused pointer when HAS_FOUND is off
        launch(_low_rank_adam_kernel, (cdiv(n, block),), low_grad, exp_avg, exp_avg_sq, update, flag, n, beta1, beta2,
               eps, HAS_FOUND=found_inf is not None, BLOCK=block)
        _matmul_update(weight, update, ortho, left, step_size, scale, decay, found_inf, step_size_t, precision, exp_avg)


def lowrank_update_triton(weight, update, ortho, left, step_size, scale, decay, found_inf=None, step_size_t=None,
                          tf32=False, precision=None):
    """weightkit.ops.galore.lowrank_update_: the matmul-update kernel alone, for a given direction ``update``
    (contiguous; read, never written; float32, or a 16-bit ortho's dtype: the backend passes it so, as
    galore_adam_update_'s kernel writes it). Precision as :func:`galore_adam_update_triton`'s. Launches on the
    weight's device."""
    precision = _matmul_precision(ortho, tf32, precision)
    with device_guard(weight.device):
        _matmul_update(weight, update, ortho, left, step_size, scale, decay, found_inf, step_size_t, precision,
                       update if update.dtype == torch.float32 else _spare(weight.device))


_SPARES = {}  # device -> a one-element float32 tensor: the pointer of the flags that are off (never read)


def _spare(device):
    spare = _SPARES.get(device)
    if spare is None:
        spare = _SPARES[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return spare


def _matmul_update(weight, update, ortho, left, step_size, scale, decay, found_inf, step_size_t, precision, spare):
    """W <- decay W - step_size scale decay (P U | U P) by _matmul_update_kernel, its config tuned per key; ``spare``:
    a float32 tensor passed for the flags that are off (never read)."""
    flag = found_inf if found_inf is not None else spare  # an unused pointer when HAS_FOUND is off
    a, b = (ortho, update) if left else (update, ortho)
    m_rows, n_cols = weight.shape
    k = a.shape[1]
    has_step = step_size_t is not None
    alpha = -scale * decay if has_step else -step_size * scale * decay

    def grid(meta):
        return (cdiv(m_rows, meta["BLOCK_M"]) * cdiv(n_cols, meta["BLOCK_N"]),)

    step_t = step_size_t if has_step else flag
    args = (a, b, weight, flag, step_t, m_rows, n_cols, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            weight.stride(0), weight.stride(1), alpha, decay)
    meta = dict(HAS_FOUND=found_inf is not None, HAS_STEP=has_step, PRECISION=precision, W_DTYPE=str(weight.dtype),
                UPCAST_16BIT=INTERPRET)
    tuning_key = (m_rows, n_cols, k, precision, a.dtype, b.dtype, weight.dtype, flag.dtype, step_t.dtype)
    cfg = _TUNED.get(tuning_key)
    if cfg is None and capturing():
        cfg = _matmul_update_kernel.configs[0]  # provisional (see above)
    if cfg is not None:
        launch(_matmul_update_kernel.fn, grid(cfg.kwargs), *args, **meta, **cfg.all_kwargs())
        return
    with TUNE_LOCK:  # one tuning at a time (kernels/_shared.py)
        _matmul_update_kernel[grid](*args, **meta)
        _TUNED[tuning_key] = _matmul_update_kernel.best_config


# -- bf16_parts (spec: weightkit.ops.galore.bf16_parts) ------------------------------------------------------------
# A float32 (float16) gradient's exact bf16 parts, stacked, for the projection's bf16 GEMMs: one pass, x read once
# (4 or 2 bytes a value) and each part written once (2 bytes), 10 bytes a float32 value where torch's elementwise
# ops take four passes and about 30. Elementwise over 2-D tiles, x's columns along the tile's fast axis; the config
# sets the tile (bucket: R and C rounded up to powers of two, the dtype).

@triton.jit
def _bf16_parts_kernel(x_ptr, out_ptr, R, C, stride_xr, stride_xc, stride_or, part_step, COUNT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Part i of x[r, c] at out_ptr + i * part_step + r * stride_or + c (out's rows contiguous). COUNT 3 (float32
    x): hi, mid, lo, each the nearest bf16 of what the previous ones left (round_bf16: NaN stays NaN), the differences
    exact; COUNT 2 (float16 x): hi = x with its three lowest significand bits cleared, lo = x - hi (exact)."""
    pid = tl.program_id(0).to(tl.int64)  # a 1-D grid, tiles row-major (a second grid axis stops at 65535)
    tiles_c = tl.cdiv(C, BLOCK_C)
    rows = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
    out = out_ptr + rows[:, None] * stride_or + cols[None, :]
    if COUNT == 2:
        hi = (x.to(tl.int16, bitcast=True) & -8).to(tl.float16, bitcast=True)
        tl.store(out, hi.to(tl.bfloat16), mask=mask)
        tl.store(out + part_step, (x - hi).to(tl.bfloat16), mask=mask)
    else:
        hi = round_bf16(x)
        rest = x - hi
        mid = round_bf16(rest)
        tl.store(out, hi.to(tl.bfloat16), mask=mask)  # exact casts: each part holds a bf16 value already
        out = out + part_step  # (two pointer steps, not 2 * part_step: an int32 part_step may pass 2^30)
        tl.store(out, mid.to(tl.bfloat16), mask=mask)
        tl.store(out + part_step, (rest - mid).to(tl.bfloat16), mask=mask)


PARTS_TUNE_MIN = 1 << 20  # smaller x: one fixed config (launch-bound)
_PARTS_FIXED = config(4, 1, BLOCK_R=8, BLOCK_C=256)
_PARTS = Launcher(_bf16_parts_kernel,
                  space(lambda: [config(w, 1, BLOCK_R=r, BLOCK_C=c) for r, c in ((4, 1024), (8, 512), (16, 256),
                                                                                  (32, 128), (16, 512), (32, 256))
                                 for w in (4, 8)], config(4, 1, BLOCK_R=8, BLOCK_C=64)),
                  key=["R", "C", "COUNT"])
bf16_parts_autotune = _PARTS.autotuner


def bf16_parts_triton(x, dim):
    """x (2-D float32 or float16) as its exact bf16 parts (3 or 2), largest first, stacked along ``dim`` in a new
    contiguous bf16 tensor (weightkit.ops.galore.bf16_parts). Launches on x's device."""
    count = 3 if x.dtype == torch.float32 else 2
    rows, cols = x.shape
    shape = (count * rows, cols) if dim == 0 else (rows, count * cols)
    with device_guard(x.device):
        out = torch.empty(shape, dtype=torch.bfloat16, device=x.device)
        if x.numel() == 0:
            return out
        part_step = rows * cols if dim == 0 else cols
        fixed = None if INTERPRET or x.numel() >= PARTS_TUNE_MIN else _PARTS_FIXED
        bucket = (next_pow2(rows), next_pow2(cols), x.dtype, dim, x.device)
        _PARTS.launch((rows, cols, x.dtype, dim, x.device),
                      (x, out, rows, cols, x.stride(0), x.stride(1), out.stride(0), part_step),
                      lambda: (bucket, lambda c: (cdiv(rows, c["BLOCK_R"]) * cdiv(cols, c["BLOCK_C"]),),
                               dict(COUNT=count), fixed))
    return out
