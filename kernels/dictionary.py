"""Triton kernels of the dictionary layers (spec: weightkit.ops.dictionary).

``dict_bitmask_matmul`` (S in the bitmask format): see the section comment further down.
"""

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .int8 import (_INTERPRET, _config, _device_info, _gemv_rows, _gemv_store_rows, _k_range, _pick_splits,
                   _splitk_sum_kernel, _store_result, _tile_ids)


# ---------------------------------------------------------------------------------------------------------
# dict_bitmask_matmul: y = Z S, S (K x N) in the bitmask format (int32 mask words [W, N], values [s, N] in atom
# order per column, word_offsets [W, N] = set bits of a column before each word). All kernels work on S tiles of
# BLOCK_K atoms (a multiple of 32: whole words) x BLOCK_N columns, decoded in registers (_tile_ranks): the tile's
# BLOCK_K / 32 x BLOCK_N words are loaded once (16-byte loads along N), expanded to bits with one shift per atom, and
# a cumulative sum over the atoms gives each set bit its row in ``values`` (the column's offset at the tile's first
# word + the bits before it in the tile). The values are then loaded where a bit is set (each value of the tile
# exactly once; neighbouring columns read neighbouring rows of ``values``, so their sectors are shared through L1/L2)
# and the tile is dense in registers: zeros where no bit is set. Accumulation is always fp32.
#
# Forward, picked by the number of tokens M (as the int8/INT4 layers do, kernels/int8.py):
# * M <= GEMV_MAX_M (decode), _bitmask_gemv_kernel: no tensor cores. Grid (N / BLOCK_N, SPLIT_K): each program
#   decodes its BLOCK_N columns over K / SPLIT_K atoms (so every mask word and value is read once in all) and adds
#   z[m, k] * S[k, n] into an fp32 [BLOCK_K, BLOCK_N] register tile per token, reduced once after the loop. The offset
#   of the split's first word comes from word_offsets, later ones by adding the tile's popcounts. SPLIT_K makes one
#   token fill the GPU (64 column tiles x 8 splits for a 4096-wide layer).
# * M > GEMV_MAX_M, _bitmask_mm_kernel: tensor cores. The decoded tile, transposed, is the LEFT operand of
#   acc[n, m] += S^T[n, k-tile] . Z[m, k-tile]^T (on Hopper it feeds wgmma from registers; Z comes from shared
#   memory), fp32 accumulator, grouped tile order; SPLIT_K > 1 only up to SPLIT_MAX_M tokens.
# Split-K partials: [SPLIT_K, M, N] fp32, summed in a fixed order by int8's _splitk_sum_kernel (deterministic).
# Backward (the bitmask is frozen):
# * grad_z = G S^T (M x K): the same two kernels with the roles of K and N swapped (_bitmask_t_gemv_kernel,
#   _bitmask_t_mm_kernel): a program owns a K tile and reduces over N (split over N for parallelism); each S tile's
#   offsets are read from word_offsets (the tile's first word), so no program scans the words before it.
# * grad_values: _bitmask_grad_values_kernel, a program per (K tile, N tile): acc = Z[:, k-tile]^T G[:, n-tile] by
#   tensor cores over all M, then each set bit's entry is stored at its row of grad_values: every entry is written
#   exactly once (no atomics, deterministic). It computes the dense K x N product, twice the useful FLOPs at 50%
#   density, which tensor cores pay for more cheaply than a gather would.
# Autotuned (triton.autotune) for S with >= TUNE_MIN_WEIGHT entries; one fixed config otherwise (launch-bound sizes),
# and one config per tuner under the interpreter. Index arithmetic is int32 in the values (s N < 2^31, checked).

GEMV_MAX_M = 4
SPLIT_MAX_M = 64
TUNE_MIN_WEIGHT = 1 << 20  # tests lower it to run the tuned path under the interpreter
_SPLITS = (1, 2, 4, 8, 16)


@triton.jit
def _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(bits, rows) of the S tile of words w0 .. w0 + BLOCK_K / 32 - 1 (atoms 32 w0 ..) and columns rn: bits
    [BLOCK_K, BLOCK_N] int32 (1 where the atom is used; 0 past K or N) and each set bit's row in values, given the
    columns' set bits before word w0 (off, [BLOCK_N])."""
    rw = w0 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(bm_ptr + rw[:, None] * N + rn[None, :], mask=(rw < W)[:, None] & mask_n[None, :], other=0,
                    eviction_policy="evict_first")
    shifts = tl.arange(0, 32)
    bits = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 1, (BLOCK_K, BLOCK_N))
    rows = tl.cumsum(bits, axis=0) - bits + off[None, :]
    return bits, rows


@triton.jit
def _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dense S tile [BLOCK_K, BLOCK_N] (values' dtype, zeros where no bit is set) and its per-column popcount."""
    bits, rows = _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
    vals = tl.load(v_ptr + rows * N + rn[None, :], mask=bits != 0, other=0.0, eviction_policy="evict_first")
    return vals, tl.sum(bits, axis=0)


@triton.jit
def _split_offsets(off_ptr, k_lo, K, rn, mask_n, N):
    """Set bits of each column before atom k_lo (a multiple of 32): word_offsets' row k_lo / 32 (0 for an empty
    split past K)."""
    return tl.load(off_ptr + (k_lo // 32) * N + rn, mask=mask_n & (rn * 0 + k_lo < K), other=0).to(tl.int32)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _bitmask_gemv_kernel(z_ptr, v_ptr, bm_ptr, off_ptr, y_ptr, p_ptr, M, N, K, W, stride_zm, MB, SPLIT_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode: y[m, n] (m < M <= BLOCK_M <= 4) = sum over this split's atoms k of z[m, k] S[k, n], no tensor cores."""
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    off = _split_offsets(off_ptr, k_lo, K, rn, mask_n, N)
    rk = k_lo + tl.arange(0, BLOCK_K)
    acc0 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        s, count = _decode_tile(v_ptr, bm_ptr, k0 // 32, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
        off += count
        s = s.to(tl.float32)
        mask_k = rk < K
        acc0, acc1, acc2, acc3 = _gemv_rows(acc0, acc1, acc2, acc3, z_ptr, stride_zm, M, rk, mask_k, s, 1.0, True,
                                            BLOCK_M)
        rk += BLOCK_K
    _gemv_store_rows(y_ptr, p_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, True, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _bitmask_mm_kernel(z_ptr, v_ptr, bm_ptr, off_ptr, y_ptr, p_ptr, M, N, K, W, stride_zm, MB, SPLIT_K,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr = 8, DOT_F32: tl.constexpr = False):
    """Tensor cores: acc[n, m] += S^T[n, k-tile] . z[m, k-tile]^T, S decoded in registers to z's dtype."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    off = _split_offsets(off_ptr, k_lo, K, rn, mask_n, N)
    rk = k_lo + tl.arange(0, BLOCK_K)
    z_ptrs = z_ptr + rm.to(tl.int64)[:, None] * stride_zm + rk[None, :]
    dt = z_ptr.dtype.element_ty
    if DOT_F32:  # the interpreter multiplies bf16 (stored as uint16) as integers: give it fp32 operands
        dt = tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        zt = tl.load(z_ptrs, mask=mask_m[:, None] & (rk < K)[None, :], other=0.0, eviction_policy="evict_last")
        s, count = _decode_tile(v_ptr, bm_ptr, k0 // 32, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
        off += count
        acc = tl.dot(tl.trans(s.to(dt)), tl.trans(zt.to(dt)), acc=acc, input_precision=PRECISION,
                     out_dtype=tl.float32)
        rk += BLOCK_K
        z_ptrs += BLOCK_K
    _store_result(y_ptr, p_ptr, tl.trans(acc), rm, rn, M, N, SPLIT_K)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _bitmask_t_gemv_kernel(g_ptr, v_ptr, bm_ptr, off_ptr, gz_ptr, p_ptr, M, N, K, W, MB, SPLIT_K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_z for M <= BLOCK_M <= 4 tokens: gz[m, k] = sum over this split's columns n of g[m, n] S[k, n]. Grid
    (K / BLOCK_K, SPLIT_K over N)."""
    n_lo, n_hi = _k_range(N, SPLIT_K, BLOCK_N)
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    w0 = tl.program_id(0) * (BLOCK_K // 32)
    acc0 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    rn = n_lo + tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        mask_n = rn < N
        off = tl.load(off_ptr + w0 * N + rn, mask=mask_n, other=0).to(tl.int32)
        s, _ = _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
        s = s.to(tl.float32)
        acc0, acc1, acc2, acc3 = _gemv_rows(acc0, acc1, acc2, acc3, g_ptr, N, M, rn, mask_n, s, 1.0, False, BLOCK_M)
        rn += BLOCK_N
    _gemv_store_rows(gz_ptr, p_ptr, acc0, acc1, acc2, acc3, rk, M, K, SPLIT_K, False, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _bitmask_t_mm_kernel(g_ptr, v_ptr, bm_ptr, off_ptr, gz_ptr, p_ptr, M, N, K, W, MB, SPLIT_K,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8, DOT_F32: tl.constexpr = False):
    """grad_z by tensor cores: acc[k, m] += S[k-tile, n-tile] . g[m, n-tile]^T over this split's columns."""
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    n_lo, n_hi = _k_range(N, SPLIT_K, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w0 = pid_k * (BLOCK_K // 32)
    mask_m = rm < M
    rn = n_lo + tl.arange(0, BLOCK_N)
    g_ptrs = g_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    dt = g_ptr.dtype.element_ty
    if DOT_F32:
        dt = tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        mask_n = rn < N
        gt = tl.load(g_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_last")
        off = tl.load(off_ptr + w0 * N + rn, mask=mask_n, other=0).to(tl.int32)
        s, _ = _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
        acc = tl.dot(s.to(dt), tl.trans(gt.to(dt)), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
        rn += BLOCK_N
        g_ptrs += BLOCK_N
    _store_result(gz_ptr, p_ptr, tl.trans(acc), rm, rk, M, K, SPLIT_K)


@triton.jit(do_not_specialize=["MB"])
def _bitmask_grad_values_kernel(z_ptr, g_ptr, bm_ptr, off_ptr, gv_ptr, M, N, K, W, MB, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                DOT_F32: tl.constexpr = False):
    """grad_values: acc[k, n] = sum over m of z[m, k] g[m, n] for the tile, stored at each set bit's row."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w0 = tl.program_id(1) * (BLOCK_K // 32)
    mask_n, mask_k = rn < N, rk < K
    rm = tl.arange(0, BLOCK_M)
    z_ptrs = z_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
    g_ptrs = g_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    dt = z_ptr.dtype.element_ty
    if DOT_F32:
        dt = tl.float32
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mask_m = m0 + rm < M
        zt = tl.load(z_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        gt = tl.load(g_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(zt.to(dt)), gt.to(dt), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
        z_ptrs += BLOCK_M * K
        g_ptrs += BLOCK_M * N
    off = tl.load(off_ptr + w0 * N + rn, mask=mask_n, other=0).to(tl.int32)
    bits, rows = _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
    tl.store(gv_ptr + rows * N + rn[None, :], acc.to(gv_ptr.dtype.element_ty), mask=bits != 0)


# -- launch ----------------------------------------------------------------------------------------------------

def _gemv_configs():
    """(BLOCK_N, BLOCK_K, warps) x SPLIT_K: 16-byte mask-word loads along N, a few KB of S per step, <= 64 fp32
    accumulators per thread per token (the pruner checks it and picks the splits that fill the GPU)."""
    if _INTERPRET:
        return [_config(4, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)]
    tiles = [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (256, 64, 8), (32, 128, 4), (128, 32, 4)]
    return [_config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s) for bn, bk, w in tiles for s in _SPLITS]


def _mm_configs(fwd):
    """Tensor-core tiles (BLOCK_N x BLOCK_K of S, BLOCK_M tokens). Decode (<= SPLIT_MAX_M tokens): BLOCK_M 16-64
    with split-K; prefill: 64-128 x 64-256 x 32-128 tiles, 4-8 warps, 3-4 stages (Triton's matmul tutorial,
    gemlite), plus small BLOCK_K = 32 tiles for fp32 without TF32 ("ieee": the dot runs on FMA units). In the
    transposed kernel (grad_z) BLOCK_K is the output side and BLOCK_N the reduction."""
    if _INTERPRET:
        return [_config(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)]
    out = []
    for bn, bk, w, st in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 32, 4, 3)]:
        for bm in (16, 32, 64):
            for s in _SPLITS[:4]:
                out.append(_config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s))
    for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                              (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3)]:
        if not fwd:  # grad_z: the K tile is the output side, N the reduction
            bn, bk = bk, bn
        out.append(_config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1))
    return out


def _grad_values_configs():
    if _INTERPRET:
        return [_config(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)]
    tiles = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3),
             (64, 64, 32, 4, 3), (64, 64, 16, 4, 3)]
    return [_config(w, st, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm) for bn, bk, bm, w, st in tiles]


def _gemv_pruner(out_axis, red_axis):
    """Keep tiles with <= 64 fp32 accumulators per thread and token, and the SPLIT_K values that fill the GPU.
    ``out_axis``/``red_axis``: the kernel arguments that are the output and reduction lengths."""
    def prune(configs, named_args, **kwargs):
        n_out, n_red, bm = named_args[out_axis], named_args[red_axis], kwargs["BLOCK_M"]
        out_block, red_block = ("BLOCK_N", "BLOCK_K") if out_axis == "N" else ("BLOCK_K", "BLOCK_N")
        sms, _ = _device_info(named_args["v_ptr"].device)
        fit = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
        out = _pick_splits(fit, lambda c: cdiv(n_out, c.kwargs[out_block]),
                           lambda c: cdiv(n_red, c.kwargs[red_block]), sms,
                           lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps))
        return out or fit[:1] or configs[:1]
    return prune


def _mm_pruner(out_axis, red_axis, first):
    def prune(configs, named_args, **kwargs):
        m, n_out, n_red = named_args["M"], named_args[out_axis], named_args[red_axis]
        out_block, red_block = ("BLOCK_N", "BLOCK_K") if out_axis == "N" else ("BLOCK_K", "BLOCK_N")
        x = named_args[first]
        sms, smem = _device_info(x.device)
        mb = next_pow2(m)
        decode = m <= SPLIT_MAX_M
        fma = kwargs["PRECISION"] == "ieee" and x.dtype == torch.float32  # BLOCK_K / BLOCK_N <= 32 tiles only
        fit = []
        for c in configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            if (min(bn, bk) <= 32) != fma:
                continue
            if decode:
                if bm != min(max(mb, 16), 32 if fma else 64):
                    continue
            elif c.kwargs["SPLIT_K"] > 1 or bm < 64 or bm > max(mb, 64):
                continue
            # pipelined activation tiles + the decoded S tile and its layout conversion
            if c.num_stages * bm * c.kwargs[red_block] * x.element_size() + 2 * bn * bk * x.element_size() > smem:
                continue
            fit.append(c)
        if not decode:
            return fit or configs[-1:]
        out = _pick_splits(fit, lambda c: cdiv(n_out, c.kwargs[out_block]) * cdiv(m, c.kwargs["BLOCK_M"]),
                           lambda c: cdiv(n_red, c.kwargs[red_block]), sms,
                           lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                      c.num_stages))
        return out or fit[:1] or configs[:1]
    return prune


def _gv_pruner(configs, named_args, **kwargs):
    fma = kwargs["PRECISION"] == "ieee" and named_args["z_ptr"].dtype == torch.float32
    fit = [c for c in configs if (c.kwargs["BLOCK_M"] <= 16) == fma]
    return fit or configs[:1]


_KEY = ["MB", "N", "K"]
bitmask_gemv_autotune = triton.autotune(_gemv_configs(), key=_KEY,
                                        prune_configs_by={"early_config_prune": _gemv_pruner("N", "K")})(
    _bitmask_gemv_kernel)
bitmask_mm_autotune = triton.autotune(_mm_configs(True), key=_KEY + ["PRECISION"],
                                      prune_configs_by={"early_config_prune": _mm_pruner("N", "K", "z_ptr")})(
    _bitmask_mm_kernel)
bitmask_t_gemv_autotune = triton.autotune(_gemv_configs(), key=_KEY,
                                          prune_configs_by={"early_config_prune": _gemv_pruner("K", "N")})(
    _bitmask_t_gemv_kernel)
bitmask_t_mm_autotune = triton.autotune(_mm_configs(False), key=_KEY + ["PRECISION"],
                                        prune_configs_by={"early_config_prune": _mm_pruner("K", "N", "g_ptr")})(
    _bitmask_t_mm_kernel)
bitmask_grad_values_autotune = triton.autotune(_grad_values_configs(), key=_KEY + ["PRECISION"],
                                               prune_configs_by={"early_config_prune": _gv_pruner})(
    _bitmask_grad_values_kernel)


def _precision(x):
    return "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _dot_meta(x):
    """PRECISION, and fp32 dot operands for bf16 under the interpreter (see DOT_F32)."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return dict(PRECISION="ieee", DOT_F32=True)
    return dict(PRECISION=_precision(x))


def _check_sizes(values):
    if values.numel() >= 2 ** 31:
        raise ValueError(f"values has {values.numel()} entries; the Triton bitmask kernels index them in int32 "
                         f"(< 2^31 entries)")


def _split_matmul(kernels, tuners, act, wargs, out, M, n_out, n_red, extra, fixed):
    """Launch the GEMV (M <= GEMV_MAX_M) or tensor-core kernel writing out (M x n_out), reducing over n_red, with
    split partials summed by _splitk_sum_kernel. ``fixed``: the one config for small S."""
    gemv = M <= GEMV_MAX_M
    mb = next_pow2(M)
    kernel, tuner = (kernels[0], tuners[0]) if gemv else (kernels[1], tuners[1])
    meta = dict(BLOCK_M=mb) if gemv else _dot_meta(act)
    out_block = "BLOCK_N" if kernels[0] is _bitmask_gemv_kernel else "BLOCK_K"
    if gemv:
        grid = lambda c: (cdiv(n_out, c[out_block]), c["SPLIT_K"])  # noqa: E731
    else:
        grid = lambda c: (cdiv(M, c["BLOCK_M"]) * cdiv(n_out, c[out_block]), c["SPLIT_K"])  # noqa: E731
    args = (act, *wargs, out)
    if n_red * n_out >= TUNE_MIN_WEIGHT:
        may_split = M <= SPLIT_MAX_M or len(tuner.configs) == 1
        max_split = max(c.kwargs["SPLIT_K"] for c in tuner.configs) if may_split else 1
        part = torch.empty((max_split, M, n_out), dtype=torch.float32, device=act.device) if max_split > 1 else out
        tuner[grid](*args, part, *extra, mb, **meta)
        split = tuner.best_config.kwargs["SPLIT_K"]
    else:
        cfg = fixed(gemv, mb, meta)
        kernel[grid(dict(cfg, SPLIT_K=1))](*args, out, *extra, mb, 1, **meta, **cfg, num_warps=4,
                                           num_stages=1 if gemv else 2)
        split, part = 1, out
    if split > 1:
        mn = M * n_out
        _splitk_sum_kernel[(cdiv(mn, 1024),)](part, out, mn, split, BLOCK=1024, num_warps=4)
    return out


def _fixed_fwd(gemv, mb, meta):
    if gemv:
        return dict(BLOCK_N=64, BLOCK_K=64 if mb <= 2 else 32)
    fma = meta["PRECISION"] == "ieee"
    return dict(BLOCK_M=min(max(mb, 16), 32 if fma else 64), BLOCK_N=64, BLOCK_K=32 if fma else 64)


def _fixed_t(gemv, mb, meta):
    if gemv:
        return dict(BLOCK_K=64, BLOCK_N=64 if mb <= 2 else 32)
    fma = meta["PRECISION"] == "ieee"
    return dict(BLOCK_M=min(max(mb, 16), 32 if fma else 64), BLOCK_K=64, BLOCK_N=32 if fma else 64)


def dict_bitmask_matmul_triton(z, values, bitmask, word_offsets):
    """y = z S (contiguous inputs; see the section comment)."""
    _check_sizes(values)
    (M, K), N = z.shape, values.shape[1]
    y = torch.empty((M, N), dtype=z.dtype, device=z.device)
    return _split_matmul((_bitmask_gemv_kernel, _bitmask_mm_kernel), (bitmask_gemv_autotune, bitmask_mm_autotune), z,
                         (values, bitmask, word_offsets), y, M, N, K, (M, N, K, bitmask.shape[0], z.stride(0)),
                         _fixed_fwd)


def dict_bitmask_matmul_backward_triton(grad, z, values, bitmask, word_offsets):
    """(grad_z = grad S^T in z's dtype, grad_values in values' dtype), contiguous inputs."""
    _check_sizes(values)
    (M, K), N, W = z.shape, values.shape[1], bitmask.shape[0]
    gz = torch.empty((M, K), dtype=z.dtype, device=z.device)
    _split_matmul((_bitmask_t_gemv_kernel, _bitmask_t_mm_kernel), (bitmask_t_gemv_autotune, bitmask_t_mm_autotune),
                  grad, (values, bitmask, word_offsets), gz, M, K, N, (M, N, K, W), _fixed_t)
    gv = torch.empty_like(values)
    if grad.dtype != z.dtype:  # the dot takes one dtype: z's
        grad = grad.to(z.dtype)
    mb = next_pow2(M)
    meta = _dot_meta(z)
    grid = lambda c: (cdiv(N, c["BLOCK_N"]), cdiv(K, c["BLOCK_K"]))  # noqa: E731
    if K * N >= TUNE_MIN_WEIGHT:
        bitmask_grad_values_autotune[grid](z, grad, bitmask, word_offsets, gv, M, N, K, W, mb, **meta)
    else:
        cfg = dict(BLOCK_M=16 if meta["PRECISION"] == "ieee" else 32, BLOCK_N=64, BLOCK_K=64)
        _bitmask_grad_values_kernel[grid(cfg)](z, grad, bitmask, word_offsets, gv, M, N, K, W, mb, **meta, **cfg,
                                               num_warps=4, num_stages=2)
    return gz, gv
