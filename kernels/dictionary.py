"""Triton kernels of the dictionary layers (spec: weightkit.ops.dictionary).

``dict_bitmask_matmul`` (S in the bitmask format): see the section comment further down.
"""

import torch
import triton
import triton.language as tl

from ._shared import (INTERPRET, SPLIT_MAX_M, SPLITS, Launcher, SplitKMatmul, cdiv, config, device_guard, device_info,
                      dot_meta, dot_precision, gemv_accumulators, gemv_rows, gemv_store_rows, k_range, mm_fits,
                      next_pow2, pick_splits, space, store_result, tile_ids, unless_few_tokens)


# ---------------------------------------------------------------------------------------------------------
# dict_bitmask_matmul: y = Z S, S (K x N) in the bitmask format (int32 mask words [W, N], values [s, N] in atom
# order per column, word_offsets [W, N] = set bits of a column before each word). All kernels work on S tiles of
# BLOCK_K atoms (a multiple of 32: whole words) x BLOCK_N columns, decoded in registers (_tile_ranks, _decode_tile):
# the tile's BLOCK_K / 32 x BLOCK_N words are loaded once (16-byte loads along N), and each atom's row in ``values``
# is computed elementwise by popcounts, with no scan over the atoms: atom b of word w has row off + (the popcounts of
# the tile's words before w) + popc(word & ((1 << b) - 1)), off being the column's set bits before the tile (the
# popc instruction on the GPU, a SWAR count under the interpreter). The values are then taken where a bit is set, in
# one of two ways the autotuner times (SPAN): each loaded where it lies (lanes run along N, but neighbouring columns'
# ranks differ, so a warp's load touches a sector per lane), or the tile's rows [lo, lo + BLOCK_K) of values (lo:
# its columns' least offset) loaded as one block with 16-byte loads along N and each value picked out of it in
# registers (tl.gather), set bits past the block (columns whose offsets differ by BLOCK_K / 2 or more) loaded where
# they lie in a branch only such tiles take. The tile is then dense in registers: zeros where no bit is set.
# Accumulation is always fp32.
#
# Forward, picked by the number of tokens M (as the int8/INT4 layers do, kernels/_shared.py):
# * M <= GEMV_MAX_M (decode), _bitmask_gemv_kernel: no tensor cores. Grid (N / BLOCK_N, SPLIT_K): each program
#   decodes its BLOCK_N columns over K / SPLIT_K atoms (so every mask word and value is read once in all) and adds
#   z[m, k] * S[k, n] into an fp32 [BLOCK_K, BLOCK_N] register tile per token, reduced once after the loop. The offset
#   of the split's first word comes from word_offsets, later ones by adding the tile's popcounts. SPLIT_K makes one
#   token fill the GPU (64 column tiles x 8 splits for a 4096-wide layer).
# * M > GEMV_MAX_M, _bitmask_mm_kernel: tensor cores. The decoded tile, transposed, is the LEFT operand of
#   acc[n, m] += S^T[n, k-tile] . Z[m, k-tile]^T (on Hopper it feeds wgmma from registers; Z comes from shared
#   memory), fp32 accumulator, grouped tile order; SPLIT_K > 1 only up to SPLIT_MAX_M tokens.
# Split-K partials: [SPLIT_K, M, N] fp32, summed in split order by the output tile's last split to arrive, in the same
# launch (_shared.splitk_finish, as the int8/INT4 matmuls: one kernel per call, deterministic, graph-replayable).
# Backward (the bitmask is frozen):
# * grad_z = G S^T (M x K): the same two kernels with the roles of K and N swapped (_bitmask_t_gemv_kernel,
#   _bitmask_t_mm_kernel): a program owns a K tile and reduces over N (split over N for parallelism); each S tile's
#   offsets are read from word_offsets (the tile's first word), so no program scans the words before it.
# * grad_values: _bitmask_grad_values_kernel, a program per (K tile, N tile): acc = Z[:, k-tile]^T G[:, n-tile] by
#   tensor cores over all M, then each set bit's entry is stored at its row of grad_values (ranks by popcount as
#   above): every entry is written exactly once (no atomics, deterministic). It computes the dense K x N product,
#   twice the useful FLOPs at 50% density, which tensor cores pay for more cheaply than a gather would.
# Autotuned for S with >= TUNE_MIN_WEIGHT entries, once per token bucket (kernels/_shared.py, Launcher: later calls
# launch a cached plan); one fixed config otherwise (launch-bound sizes; FIXED_SPAN), and one config per tuner under
# the interpreter. sm_90 compiles (Triton 3.9, ptxas) of the tuned tiles, both SPANs: no spills. Index arithmetic
# is int32 in values and the mask words (s N and W N < 2^31, checked), int64 in the activations and gradients.

TUNE_MIN_WEIGHT = 1 << 20  # tests lower it to run the tuned path under the interpreter
FIXED_SPAN = 1  # the value loads of the untuned configs (_decode_tile's SPAN; the tests run both)

# The GPU's popcount instruction; the interpreter has no libdevice, so it counts with the same result by SWAR.
_HW_POPC = tl.constexpr(not INTERPRET)


@triton.jit
def _popc(x):
    """Set bits of each int32 in x (any sign: the 32-bit pattern), as int32."""
    if _HW_POPC:
        return tl.extra.cuda.libdevice.popc(x)
    else:  # SWAR: pairs, nibbles, bytes, then the byte sums (the masks drop what the arithmetic shifts bring in)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = x + (x >> 8)
        return (x + (x >> 16)) & 0x3F


@triton.jit
def _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(bits, rows) of the S tile of words w0 .. w0 + BLOCK_K / 32 - 1 (atoms 32 w0 ..) and columns rn: bits
    [BLOCK_K, BLOCK_N] int32 (1 where the atom is used; 0 past K or N) and each atom's row in values (a set bit's
    value; for a clear bit, the row of the next set one), given the columns' set bits before word w0 (off,
    [BLOCK_N]), and the tile's popcount per column. Elementwise, no scan over the atoms: atom b of word w has row
    off + (popcounts of the tile's words before w) + popc(word & ((1 << b) - 1))."""
    rw = w0 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(bm_ptr + rw[:, None] * N + rn[None, :], mask=(rw < W)[:, None] & mask_n[None, :], other=0,
                    eviction_policy="evict_first")
    counts = _popc(words)  # [BLOCK_K / 32, BLOCK_N]
    base = off[None, :] + tl.cumsum(counts, axis=0) - counts  # set bits before each word (a scan over <= 8 words)
    shifts = tl.arange(0, 32)
    below = (1 << shifts) - 1  # bit b: the bits under it (b = 31: 0x7fffffff, two's complement wrap)
    w3 = words[:, None, :]
    bits = tl.reshape((w3 >> shifts[None, :, None]) & 1, (BLOCK_K, BLOCK_N))
    rows = tl.reshape(base[:, None, :] + _popc(w3 & below[None, :, None]), (BLOCK_K, BLOCK_N))
    return bits, rows, tl.sum(counts, axis=0)


@triton.jit
def _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, S, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPAN: tl.constexpr):
    """The dense S tile [BLOCK_K, BLOCK_N] (values' dtype, zeros where no bit is set) and its per-column popcount.

    values is [S, N] row-major: a column's nonzeros are N apart and neighbouring columns' ranks differ, so loading
    each set bit's value where it lies (SPAN=0) gives every lane its own row: one sector per lane, shared with the
    tile's other loads only through L1. SPAN=1 loads the rows the tile can use instead, [lo, lo + BLOCK_K) with lo
    the columns' least offset, as one block (16-byte loads along N, a row's BLOCK_N values in one or two sectors),
    and picks each set bit's value out of it in registers (tl.gather along the rows); a set bit past the block (a
    column whose offset is BLOCK_K / 2 or more above another's, at 50% density) is loaded where it lies, in a branch
    taken only by such tiles. The autotuner times both."""
    bits, rows, count = _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
    used = bits != 0
    if SPAN:
        lo = tl.min(tl.where(mask_n, off, 2147483647), axis=0)
        rr = lo + tl.arange(0, BLOCK_K)
        block = tl.load(v_ptr + rr[:, None] * N + rn[None, :], mask=(rr < S)[:, None] & mask_n[None, :], other=0.0)
        at = rows - lo
        inside = (at >= 0) & (at < BLOCK_K)  # (at < 0 only in the columns past N, which use nothing)
        vals = tl.gather(block, tl.where(inside, at, 0), 0)
        vals = tl.where(used & inside, vals, tl.zeros_like(vals))
        outside = used & (at >= BLOCK_K)
        if tl.max(outside.to(tl.int32)) > 0:
            far = tl.load(v_ptr + rows * N + rn[None, :], mask=outside, other=0.0)
            vals = tl.where(outside, far, vals)
    else:
        vals = tl.load(v_ptr + rows * N + rn[None, :], mask=used, other=0.0, eviction_policy="evict_first")
    return vals, count


@triton.jit
def _split_offsets(off_ptr, k_lo, K, rn, mask_n, N):
    """Set bits of each column before atom k_lo (a multiple of 32): word_offsets' row k_lo / 32 (0 for an empty
    split past K)."""
    return tl.load(off_ptr + (k_lo // 32) * N + rn, mask=mask_n & (rn * 0 + k_lo < K), other=0).to(tl.int32)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _bitmask_gemv_kernel(z_ptr, v_ptr, bm_ptr, off_ptr, y_ptr, p_ptr, c_ptr, M, N, K, W, S, stride_zm, SPLIT_K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr):
    """Decode: y[m, n] (m < M <= BLOCK_M <= 4) = sum over this split's atoms k of z[m, k] S[k, n], no tensor cores."""
    k_lo, k_hi = k_range(K, SPLIT_K, BLOCK_K)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    off = _split_offsets(off_ptr, k_lo, K, rn, mask_n, N)
    rk = k_lo + tl.arange(0, BLOCK_K)
    acc0, acc1, acc2, acc3 = gemv_accumulators(True, BLOCK_N, BLOCK_K)  # [BLOCK_K, BLOCK_N] each
    for k0 in range(k_lo, k_hi, BLOCK_K):
        s, count = _decode_tile(v_ptr, bm_ptr, k0 // 32, off, rn, mask_n, N, W, S, BLOCK_K, BLOCK_N, SPAN)
        off += count
        s = s.to(tl.float32)
        mask_k = rk < K
        acc0, acc1, acc2, acc3 = gemv_rows(acc0, acc1, acc2, acc3, z_ptr, stride_zm, M, rk, mask_k, s, 1.0, True,
                                            BLOCK_M)
        rk += BLOCK_K
    gemv_store_rows(y_ptr, p_ptr, c_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, True, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _bitmask_mm_kernel(z_ptr, v_ptr, bm_ptr, off_ptr, y_ptr, p_ptr, c_ptr, M, N, K, W, S, stride_zm, SPLIT_K,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPAN: tl.constexpr, GROUP_M: tl.constexpr = 8, DOT_F32: tl.constexpr = False):
    """Tensor cores: acc[n, m] += S^T[n, k-tile] . z[m, k-tile]^T, S decoded in registers to z's dtype."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo, k_hi = k_range(K, SPLIT_K, BLOCK_K)
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
        s, count = _decode_tile(v_ptr, bm_ptr, k0 // 32, off, rn, mask_n, N, W, S, BLOCK_K, BLOCK_N, SPAN)
        off += count
        acc = tl.dot(tl.trans(s.to(dt)), tl.trans(zt.to(dt)), acc=acc, input_precision=PRECISION,
                     out_dtype=tl.float32)
        rk += BLOCK_K
        z_ptrs += BLOCK_K
    store_result(y_ptr, p_ptr, c_ptr, acc, rm, rn, M, N, SPLIT_K)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _bitmask_t_gemv_kernel(g_ptr, v_ptr, bm_ptr, off_ptr, gz_ptr, p_ptr, c_ptr, M, N, K, W, S, SPLIT_K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPAN: tl.constexpr):
    """grad_z for M <= BLOCK_M <= 4 tokens: gz[m, k] = sum over this split's columns n of g[m, n] S[k, n]. Grid
    (K / BLOCK_K, SPLIT_K over N)."""
    n_lo, n_hi = k_range(N, SPLIT_K, BLOCK_N)
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    w0 = tl.program_id(0) * (BLOCK_K // 32)
    acc0, acc1, acc2, acc3 = gemv_accumulators(True, BLOCK_N, BLOCK_K)  # [BLOCK_K, BLOCK_N] each
    rn = n_lo + tl.arange(0, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        mask_n = rn < N
        off = tl.load(off_ptr + w0 * N + rn, mask=mask_n, other=0).to(tl.int32)
        s, _ = _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, S, BLOCK_K, BLOCK_N, SPAN)
        s = s.to(tl.float32)
        acc0, acc1, acc2, acc3 = gemv_rows(acc0, acc1, acc2, acc3, g_ptr, N, M, rn, mask_n, s, 1.0, False, BLOCK_M)
        rn += BLOCK_N
    gemv_store_rows(gz_ptr, p_ptr, c_ptr, acc0, acc1, acc2, acc3, rk, M, K, SPLIT_K, False, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K"])
def _bitmask_t_mm_kernel(g_ptr, v_ptr, bm_ptr, off_ptr, gz_ptr, p_ptr, c_ptr, M, N, K, W, S, SPLIT_K,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPAN: tl.constexpr, GROUP_M: tl.constexpr = 8,
                         DOT_F32: tl.constexpr = False):
    """grad_z by tensor cores: acc[k, m] += S[k-tile, n-tile] . g[m, n-tile]^T over this split's columns."""
    pid_m, pid_k = tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    n_lo, n_hi = k_range(N, SPLIT_K, BLOCK_N)
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
        s, _ = _decode_tile(v_ptr, bm_ptr, w0, off, rn, mask_n, N, W, S, BLOCK_K, BLOCK_N, SPAN)
        acc = tl.dot(s.to(dt), tl.trans(gt.to(dt)), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
        rn += BLOCK_N
        g_ptrs += BLOCK_N
    store_result(gz_ptr, p_ptr, c_ptr, acc, rm, rk, M, K, SPLIT_K)


@triton.jit
def _bitmask_grad_values_kernel(z_ptr, g_ptr, bm_ptr, off_ptr, gv_ptr, M, N, K, W, PRECISION: tl.constexpr,
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
        z_ptrs += tl.cast(K, tl.int64) * BLOCK_M
        g_ptrs += tl.cast(N, tl.int64) * BLOCK_M
    off = tl.load(off_ptr + w0 * N + rn, mask=mask_n, other=0).to(tl.int32)
    bits, rows, _ = _tile_ranks(bm_ptr, w0, off, rn, mask_n, N, W, BLOCK_K, BLOCK_N)
    tl.store(gv_ptr + rows * N + rn[None, :], acc.to(gv_ptr.dtype.element_ty), mask=bits != 0)


# -- launch ----------------------------------------------------------------------------------------------------

SPANS = (0, 1)  # the value loads of _decode_tile: each where it lies, or the tile's row span in one block
# Which configs the spaces hold follows the sm_90 compiles of every config (Triton 3.6, the GPU image's; cuobjdump of
# each cubin, tests/ops/test_kernels_host.py --compile tuned-all): the configs below keep every value in registers
# (at most 64 B a thread of stack). SPAN=1 holds the row span and the gather's index tile besides the decoded tile;
# the dropped ones kept 0.1-3.3 KB a thread in local memory.
MAX_MMA_TILE = 2 ** 19  # BLOCK_M x BLOCK_N x BLOCK_K of a tensor-core config: 128 x 128 x 64 spilled 0.1-0.8 KB


def _gemv_spans(bk):
    """SPAN=1 for GEMV tiles of at most 64 S rows (with 128 they spilled 56-120 B, 4 or 8 warps)."""
    return SPANS if bk <= 64 else (0,)


def _mm_spans(bm, bn, bk, warps):
    """SPAN=1 for tensor-core tiles of at most 4096 S values and 64 tokens on 8 warps (on 4, with 8192 values or with
    128 tokens, they spilled 0.1-1 KB), not for FMA tiles (a side of 32: fp32 without TF32; 0.1-3.4 KB under Triton
    3.6 or 3.9)."""
    if min(bn, bk) <= 32:
        return (0,)
    return SPANS if warps >= 8 and bn * bk <= 4096 and bm <= 64 else (0,)


def _gemv_configs():
    """(BLOCK_N, BLOCK_K, warps) x SPAN x SPLIT_K: 16-byte mask-word loads along N, a few KB of S per step, <= 64
    fp32 accumulators per thread per token (the pruner checks it and picks the splits that fill the GPU; the
    2048-value tiles are those that fit 3-4 tokens, and only there: unless_few_tokens), 8 warps from 8192-value S
    tiles and 16 for 16384 (on fewer, sm_90 compiles spilled up to 1.9 KB a thread)."""
    tiles = [(64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 128, 4), (128, 128, 16), (64, 32, 4), (32, 64, 4)]
    return [config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPAN=sp, SPLIT_K=s) for bn, bk, w in tiles for sp in _gemv_spans(bk)
            for s in SPLITS]


def _mm_configs(fwd):
    """Tensor-core tiles (BLOCK_N x BLOCK_K of S, BLOCK_M tokens) x SPAN. Decode (<= SPLIT_MAX_M tokens): BLOCK_M
    16-64 with split-K; prefill: 64-128 x 64-128 x 32-128 tiles, 8 warps, 3-4 stages (Triton's matmul tutorial,
    gemlite), plus small BLOCK_K = 32 tiles for fp32 without TF32 ("ieee": the dot runs on FMA units). In the
    transposed kernel (grad_z) BLOCK_K is the output side and BLOCK_N the reduction. The S tile's decode costs about
    as much as its MMA at prefill, so both value loads are timed there too. Warps: 8 (each thread decodes at most 32
    values a step; on 4, sm_90 compiles of the 64 x 64 tiles spilled with SPAN=1 and the FMA 64 x 64 x 32 tile with
    either), and no tile of more than MAX_MMA_TILE (Triton 3.6). The FMA decode tile stops at 32 tokens, as mm_fits
    does for decode (at 64, prefill would have taken it, on 4 warps: it spilled 128 B)."""
    out = []
    for bn, bk, w, st in [(64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3), (64, 32, 4, 3)]:
        for bm in (16, 32) if min(bn, bk) <= 32 else (16, 32, 64):  # FMA decode: <= 32 tokens a tile (mm_fits)
            for s in SPLITS[:4]:
                for sp in _mm_spans(bm, bn, bk, w):
                    if bm * bn * bk <= MAX_MMA_TILE:
                        out.append(config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPAN=sp, SPLIT_K=s))
    for bm, bn, bk, w, st in [(64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 64, 64, 8, 3), (64, 64, 32, 8, 3),
                              (128, 64, 32, 8, 3)]:
        if not fwd:  # grad_z: the K tile is the output side, N the reduction
            bn, bk = bk, bn
        for sp in _mm_spans(bm, bn, bk, w):
            out.append(config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPAN=sp, SPLIT_K=1))
    return out


def _grad_values_configs():
    """(BLOCK_N, BLOCK_K, BLOCK_M tokens a step, warps, stages); 8 warps from 8192-value output tiles (the 4-warp
    128 x 64 and 64 x 128 ones spilled 120-152 B a thread with fp32 and TF32)."""
    tiles = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3),
             (64, 64, 32, 4, 3), (64, 64, 16, 4, 3)]
    return [config(w, st, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm) for bn, bk, bm, w, st in tiles]


def _gemv_pruner(out_axis, red_axis):
    """Keep tiles with <= 64 fp32 accumulators per thread and token, and the SPLIT_K values that fill the GPU.
    ``out_axis``/``red_axis``: the kernel arguments that are the output and reduction lengths."""
    def prune(configs, named_args, **kwargs):
        n_out, n_red, bm = named_args[out_axis], named_args[red_axis], kwargs["BLOCK_M"]
        out_block, red_block = ("BLOCK_N", "BLOCK_K") if out_axis == "N" else ("BLOCK_K", "BLOCK_N")
        sms, _ = device_info(named_args["v_ptr"].device)
        fit = [c for c in configs if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
        fit = unless_few_tokens(fit)
        out = pick_splits(fit, lambda c: cdiv(n_out, c.kwargs[out_block]),
                          lambda c: cdiv(n_red, c.kwargs[red_block]), sms,
                          lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPAN"], c.num_warps))
        return out or fit[:1] or configs[:1]
    return prune


def _mm_pruner(out_axis, red_axis, first):
    def prune(configs, named_args, **kwargs):
        m, n_out, n_red = named_args["M"], named_args[out_axis], named_args[red_axis]
        out_block, red_block = ("BLOCK_N", "BLOCK_K") if out_axis == "N" else ("BLOCK_K", "BLOCK_N")
        x = named_args[first]
        sms, smem = device_info(x.device)
        fma = kwargs["PRECISION"] == "ieee" and x.dtype == torch.float32  # BLOCK_K / BLOCK_N <= 32 tiles only
        shaped = [c for c in configs if (min(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) <= 32) == fma]

        def need(c):  # pipelined activation tiles + the decoded S tile and its layout conversion (+ the gather's)
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            return (c.num_stages * bm * c.kwargs[red_block] * x.element_size()
                    + (2 + c.kwargs["SPAN"]) * bn * bk * x.element_size())

        fit = mm_fits(shaped, m, fma, smem, need)
        if m > SPLIT_MAX_M:
            return fit or configs[-1:]
        out = pick_splits(fit, lambda c: cdiv(n_out, c.kwargs[out_block]) * cdiv(m, c.kwargs["BLOCK_M"]),
                          lambda c: cdiv(n_red, c.kwargs[red_block]), sms,
                          lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPAN"],
                                     c.num_warps, c.num_stages))
        return out or fit[:1] or configs[:1]
    return prune


def _gv_pruner(configs, named_args, **kwargs):
    fma = kwargs["PRECISION"] == "ieee" and named_args["z_ptr"].dtype == torch.float32
    fit = [c for c in configs if (c.kwargs["BLOCK_M"] <= 16) == fma]
    return fit or configs[:1]


# Under the interpreter every tuner has one config (split K in two, to run the partials and their sum).
_KEY = ["M", "N", "K"]


def _split_matmul(gemv_kernel, mm_kernel, fwd):
    """The forward (y = z S: output N, reduction K) or grad_z (g S^T: output K, reduction N) kernel pair."""
    out_axis, red_axis, act = ("N", "K", "z_ptr") if fwd else ("K", "N", "g_ptr")
    gemv = Launcher(gemv_kernel, space(_gemv_configs, config(4, 1, BLOCK_N=32, BLOCK_K=64, SPAN=0, SPLIT_K=2)), _KEY,
                    _gemv_pruner(out_axis, red_axis))
    mm = Launcher(mm_kernel,
                  space(lambda: _mm_configs(fwd), config(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPAN=0, SPLIT_K=2)),
                  _KEY + ["PRECISION"], _mm_pruner(out_axis, red_axis, act))
    return SplitKMatmul(gemv, mm, "BLOCK_N" if fwd else "BLOCK_K")


_FWD = _split_matmul(_bitmask_gemv_kernel, _bitmask_mm_kernel, True)
_GRAD_Z = _split_matmul(_bitmask_t_gemv_kernel, _bitmask_t_mm_kernel, False)
_GRAD_VALUES = Launcher(_bitmask_grad_values_kernel,
                        space(_grad_values_configs, config(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)),
                        _KEY + ["PRECISION"], _gv_pruner)
# The autotuners (module-level: bench/gpu_report.py prints the configs they chose).
bitmask_gemv_autotune, bitmask_mm_autotune = _FWD.gemv.autotuner, _FWD.mm.autotuner
bitmask_t_gemv_autotune, bitmask_t_mm_autotune = _GRAD_Z.gemv.autotuner, _GRAD_Z.mm.autotuner
bitmask_grad_values_autotune = _GRAD_VALUES.autotuner


def _check_sizes(values, bitmask):
    """The bitmask kernels index values and the mask words (and word_offsets, of the same shape) in int32."""
    for name, t in (("values", values), ("bitmask", bitmask)):
        if t.numel() >= 2 ** 31:
            raise ValueError(f"{name} has {t.numel()} entries; the Triton bitmask kernels index it in int32 "
                             f"(< 2^31 entries)")


def _fixed_fwd(gemv, mb, fma):
    if gemv:
        return dict(BLOCK_N=64, BLOCK_K=64 if mb <= 2 else 32)
    return dict(BLOCK_M=min(max(mb, 16), 32 if fma else 64), BLOCK_N=64, BLOCK_K=32 if fma else 64)


def _fixed_t(gemv, mb, fma):
    if gemv:
        return dict(BLOCK_K=64, BLOCK_N=64 if mb <= 2 else 32)
    return dict(BLOCK_M=min(max(mb, 16), 32 if fma else 64), BLOCK_K=64, BLOCK_N=32 if fma else 64)


def _setup(gemv, key, act, fixed):
    """(constexprs, the fixed config or None to tune, the config bucket) of a bitmask matmul's first call."""
    M, n_out, n_red, tune, precision = key[:5]
    mb = next_pow2(M)
    meta = dict(BLOCK_M=mb) if gemv else dot_meta(act.device, act.dtype, precision)
    bucket = (mb,) + key[1:]
    if tune:
        return meta, None, bucket
    cfg = fixed(gemv, mb, not gemv and meta["PRECISION"] == "ieee")
    return meta, config(4 if gemv else 8, 1 if gemv else 2, SPLIT_K=1, SPAN=FIXED_SPAN, **cfg), bucket


def _key(M, n_out, n_red, act):
    """Everything a bitmask matmul's launch depends on: sizes, the tuning switch, precision, dtype, device."""
    return (M, n_out, n_red, n_red * n_out >= TUNE_MIN_WEIGHT, dot_precision(act), act.dtype, act.device)


def _grad_values_setup(key):
    M, N, K, tune, precision, dtype, device = key
    meta = dot_meta(device, dtype, precision)
    fixed = None if tune else config(8, 2, BLOCK_M=16 if meta["PRECISION"] == "ieee" else 32, BLOCK_N=64, BLOCK_K=64)
    return (next_pow2(M),) + key[1:], lambda c: (cdiv(N, c["BLOCK_N"]), cdiv(K, c["BLOCK_K"])), meta, fixed


def dict_bitmask_matmul_triton(z, values, bitmask, word_offsets):
    """y = z S (contiguous inputs; see the section comment)."""
    _check_sizes(values, bitmask)
    (M, K), N = z.shape, values.shape[1]
    with device_guard(z.device):
        y = torch.empty((M, N), dtype=z.dtype, device=z.device)
        if M == 0 or N == 0:
            return y
        key = _key(M, N, K, z)
        return _FWD(key, (z, values, bitmask, word_offsets), y,
                    (M, N, K, bitmask.shape[0], values.shape[0], z.stride(0)), M, N,
                    lambda gemv: _setup(gemv, key, z, _fixed_fwd))


def dict_bitmask_matmul_backward_triton(grad, z, values, bitmask, word_offsets):
    """(grad_z = grad S^T in z's dtype, grad_values in values' dtype), contiguous inputs."""
    _check_sizes(values, bitmask)
    (M, K), N, W = z.shape, values.shape[1], bitmask.shape[0]
    with device_guard(z.device):
        gz = torch.empty((M, K), dtype=z.dtype, device=z.device)
        gv = torch.empty_like(values)
        if M == 0 or K == 0 or N == 0:
            return gz.zero_(), gv.zero_()
        key = _key(M, K, N, grad)
        _GRAD_Z(key, (grad, values, bitmask, word_offsets), gz, (M, N, K, W, values.shape[0]), M, K,
                lambda gemv: _setup(gemv, key, grad, _fixed_t))
        if grad.dtype != z.dtype:  # the dot takes one dtype: z's
            grad = grad.to(z.dtype)
        key = (M, N, K, K * N >= TUNE_MIN_WEIGHT, dot_precision(z), z.dtype, z.device)
        _GRAD_VALUES.launch(key, (z, grad, bitmask, word_offsets, gv, M, N, K, W), lambda: _grad_values_setup(key))
    return gz, gv
