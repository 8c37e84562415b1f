"""Triton kernels for INT8 stochastic rounding (spec: weightkit.ops.int8, weightkit.ops.rng)."""

import os

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2


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


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _u24(bits):
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def philox_uniform4(counter, seed, N: tl.constexpr):
    """The uniforms of stream positions 4 * counter + 0..3, interleaved: N = 4 * len(counter) values, in order.
    One Philox evaluation gives four lanes (the stream's definition, weightkit.ops.rng), so this costs a quarter of
    calling philox_uniform per element."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    # join adds a last axis: join(join(a, c), join(b, d))[i, k, j] is (a, b, c, d)[2k + j]: lanes 0..3 in order
    return tl.reshape(tl.join(tl.join(_u24(r0), _u24(r2)), tl.join(_u24(r1), _u24(r3))), (N,))


def _sr_configs():
    if _INTERPRET:  # the interpreter would time every config in numpy
        return [triton.Config({"ROWS": 64}, num_warps=4)]
    return [triton.Config({"ROWS": r}, num_warps=w) for r in (128, 256, 512, 1024) for w in (4, 8)]


@triton.autotune(configs=_sr_configs(), key=["n", "OFF3"])
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


def stochastic_round_int8_triton(x, scale, group_size, seed, offset):
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    inv_scale = 1.0 / scale  # IEEE division in torch; Triton's own fp32 division is approximate
    n = x.numel()
    off3 = offset & 3

    def grid(meta):
        return (cdiv(n + off3, 4 * meta["ROWS"]),)

    _stochastic_round_int8_kernel[grid](x, inv_scale, out, n, group_size, seed, offset, OFF3=off3,
                                        enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------------------------------------------------
# int8_matmul (spec: weightkit.ops.int8.int8_matmul): y = x @ B, fp32 accumulation, y in x's dtype, with
#   transpose=False: B[k, n] = W[n, k]  (K = in features; a K-step reads BLOCK_K contiguous bytes of W's rows)
#   transpose=True:  B[k, n] = W[k, n]  (K = out rows; a K-step reads BLOCK_N contiguous bytes of W's rows)
# and W = dequant(w_q): G consecutive elements of a row share one fp32 scale (G divides in_features).
#
# Two kernels, picked by the number of tokens M (the same two exist for INT4 in kernels/int4.py):
# * M <= GEMV_MAX_M (decode), _int8_gemv_kernel: no tensor cores. Grid (N / BLOCK_N, SPLIT_K): each program
#   reads a BLOCK_N x (K / SPLIT_K) slab of the weight exactly once with 16-byte loads along W's contiguous
#   axis, dequantizes in registers and accumulates x * w into an fp32 [BLOCK_M, BLOCK_N, BLOCK_K] register tile
#   that is reduced once after the loop (a pure load + FMA loop).
# * M > GEMV_MAX_M, _int8_mm_kernel: tensor cores. The dequantized weight tile is the LEFT operand:
#   acc[n, m] = sum_k W'[n, k] x[m, k], so on Hopper it feeds wgmma from registers (x comes from shared memory)
#   and 16 decode tokens still fill a 64-row MMA with weight rows. Grid (M tiles x N tiles in grouped order,
#   SPLIT_K); SPLIT_K > 1 only up to SPLIT_MAX_M tokens.
# Split-K reduction: two passes, deterministic. Programs of split s write fp32 partials [s, M, N]; then
# _splitk_sum_kernel adds the SPLIT_K partials in a fixed order and casts to y's dtype. At <= 64 tokens the
# extra traffic (SPLIT_K * M * N * 8 bytes) is small next to the weight, there is no zeroing launch and no
# atomic contention, and results are reproducible run to run (atomics would not be).
# Scales: with BLOCK_K dividing G (transpose=False) a K-step lies in one group, so each weight row has one scale
# per step: acc += dot(q, x^T) * s[n] (q is exact in bf16/fp16/tf32: the product only rounds in fp32) or the
# tile is scaled before the dot (w = q * s in fp32, then cast), whichever the autotuner finds faster
# (SCALE_AFTER_DOT). With transpose=True the groups run along N: BLOCK_N divides G, so an N tile sees one scale
# per k, which scales the tile before the dot (or x, in fp32, in the GEMV). Any other G (or an unaligned INT4
# layout) takes ALIGNED=False: one scale gathered per element, slower, always correct.
# Autotuning only for weights of >= TUNE_MIN_WEIGHT elements with G % 64 == 0 (one fixed config otherwise;
# the interpreter gets one config per tuner): key = bucketed M (power of 2), N, K, G, precision, dtypes.

GEMV_MAX_M = 4  # at most this many tokens take the GEMV (FMA work grows with M; tensor cores take over)
SPLIT_MAX_M = 64  # split-K only up to this many tokens (partials traffic grows with M)
TUNE_MIN_WEIGHT = 1 << 20  # weights with fewer elements use one fixed config: launch-bound, tuning would not pay
TUNE_GROUP = 64  # the tuned configs need G % 64 == 0 (BLOCK_K, resp. BLOCK_N, of every config divides 64 or G)
_SPLITS = (1, 2, 4, 8, 16)


@triton.jit
def _i8_to_f32(q):
    """Exact int8 -> fp32 without the quarter-rate int-to-float conversion: the bits 0x4B000000 + (q + 128) are the
    float 2^23 + 128 + q."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program_id(0) in grouped order: GROUP_M row tiles sweep the N tiles together, so a
    weight tile is read by GROUP_M programs close in time (from L2) instead of once per row of tiles."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _k_mask(rk, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The k < K mask of a K-step (all true, no compare, when BLOCK_K divides every split: EVEN_K)."""
    if EVEN_K:
        mask = tl.full((BLOCK_K,), True, tl.int1)
    else:
        mask = rk < K
    return mask


@triton.jit
def _k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """[k_lo, k_hi) of this program's split; split boundaries are multiples of BLOCK_K, so masking k < K suffices
    inside a split (and stays vectorizable when K is a multiple of 16)."""
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * span
    return k_lo, tl.minimum(K, k_lo + span)


@triton.jit
def _store_result(y_ptr, p_ptr, out, rm, rn, M, N, SPLIT_K):
    """out [BLOCK_M, BLOCK_N] fp32: into y (cast) when unsplit, else into this split's fp32 partials."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + tl.program_id(1).to(tl.int64) * M * N + offs, out, mask=mask)


@triton.jit
def _splitk_sum_kernel(p_ptr, y_ptr, MN, SPLIT_K, BLOCK: tl.constexpr):
    """y = sum over s of partials[s] (fp32, fixed order), cast to y's dtype."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < MN
    ptrs = p_ptr + idx
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        ptrs += MN
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_row(acc, x_ptr, i: tl.constexpr, stride_xm, M, x_offs, x_mask, w, s_k, TRANS: tl.constexpr):
    """acc += x[i, k-tile] * w (w: [BLOCK_K, BLOCK_N] with TRANS, else [BLOCK_N, BLOCK_K]); s_k: per-k scales
    folded into x (TRANS), or 1."""
    xv = tl.load(x_ptr + i * stride_xm + x_offs, mask=x_mask & (x_offs * 0 + i < M), other=0.0).to(tl.float32)
    if TRANS:
        return acc + (xv * s_k)[:, None] * w
    else:
        return acc + xv[None, :] * w


@triton.jit
def _gemv_store(y_ptr, p_ptr, acc, i: tl.constexpr, rn, M, N, SPLIT_K, TRANS: tl.constexpr):
    """Reduce row i's accumulator over k and store it (into y, or into this split's fp32 partials)."""
    out = tl.sum(acc, axis=0 if TRANS else 1)
    mask = (rn < N) & (rn * 0 + i < M)  # (tensor-shaped: the 3.9 interpreter turns tensor & scalar-bool into int)
    if SPLIT_K == 1:
        tl.store(y_ptr + i * N + rn, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + (tl.program_id(1).to(tl.int64) * M + i) * N + rn, out, mask=mask)


@triton.jit
def _gemv_rows(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, x_mask, w, s_k, TRANS: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """_gemv_row for the BLOCK_M (1, 2 or 4) token rows of a decode GEMV, one accumulator each."""
    acc0 = _gemv_row(acc0, x_ptr, 0, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    if BLOCK_M > 1:
        acc1 = _gemv_row(acc1, x_ptr, 1, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    if BLOCK_M > 2:
        acc2 = _gemv_row(acc2, x_ptr, 2, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
        acc3 = _gemv_row(acc3, x_ptr, 3, stride_xm, M, x_offs, x_mask, w, s_k, TRANS)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_store_rows(y_ptr, p_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, TRANS: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """_gemv_store for the BLOCK_M token rows of a decode GEMV."""
    _gemv_store(y_ptr, p_ptr, acc0, 0, rn, M, N, SPLIT_K, TRANS)
    if BLOCK_M > 1:
        _gemv_store(y_ptr, p_ptr, acc1, 1, rn, M, N, SPLIT_K, TRANS)
    if BLOCK_M > 2:
        _gemv_store(y_ptr, p_ptr, acc2, 2, rn, M, N, SPLIT_K, TRANS)
        _gemv_store(y_ptr, p_ptr, acc3, 3, rn, M, N, SPLIT_K, TRANS)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _int8_gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, p_ptr, M, N, K, G, stride_xm, stride_xk, MB, SPLIT_K,
                      TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode: y[m, n] (m < M <= BLOCK_M <= 4) = sum over this split's k of x[m, k] B[k, n], no tensor cores.
    One 2-D fp32 accumulator per token (a 3-D [M, N, K] tile gets a layout that shuffles every step).
    EVEN_K: K % BLOCK_K == 0, no k masks."""
    pid_n = tl.program_id(0)
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn64 = rn.to(tl.int64)
    mask_n = rn < N
    rk = k_lo + tl.arange(0, BLOCK_K)
    if TRANS:  # tiles [BLOCK_K, BLOCK_N] of W's rows k, contiguous along n
        w_ptrs = q_ptr + rk.to(tl.int64)[:, None] * N + rn64[None, :]
        w_step = BLOCK_K * tl.cast(N, tl.int64)
        s_ptrs = s_ptr + rk.to(tl.int64) * (N // G) + (pid_n * BLOCK_N) // G  # ALIGNED: one scale per k
        s_step = BLOCK_K * tl.cast(N // G, tl.int64)
        shape: tl.constexpr = (BLOCK_K, BLOCK_N)
    else:  # tiles [BLOCK_N, BLOCK_K] of W's rows n, contiguous along k
        w_ptrs = q_ptr + rn64[:, None] * K + rk[None, :]
        w_step = BLOCK_K
        s_ptrs = s_ptr + rn64 * (K // G) + k_lo // G  # ALIGNED: one scale per row n and step
        s_step = 0
        shape: tl.constexpr = (BLOCK_N, BLOCK_K)
    x_offs = rk * stride_xk
    acc0 = tl.zeros(shape, dtype=tl.float32)
    acc1 = tl.zeros(shape, dtype=tl.float32)
    acc2 = tl.zeros(shape, dtype=tl.float32)
    acc3 = tl.zeros(shape, dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = _k_mask(rk, K, EVEN_K, BLOCK_K)
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
        acc0, acc1, acc2, acc3 = _gemv_rows(acc0, acc1, acc2, acc3, x_ptr, stride_xm, M, x_offs, mask_k, w, s_k, TRANS,
                                            BLOCK_M)
        rk += BLOCK_K
        x_offs += BLOCK_K * stride_xk
        w_ptrs += w_step
    _gemv_store_rows(y_ptr, p_ptr, acc0, acc1, acc2, acc3, rn, M, N, SPLIT_K, TRANS, BLOCK_M)


@triton.jit(do_not_specialize=["SPLIT_K", "MB"])
def _int8_mm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, p_ptr, M, N, K, G, stride_xm, stride_xk, MB, SPLIT_K,
                    TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SCALE_AFTER_DOT: tl.constexpr, GROUP_M: tl.constexpr = 8,
                    DOT_F32: tl.constexpr = False):
    """Tensor cores: acc[n, m] += W'[n, k-tile] . x[m, k-tile]^T, W' dequantized in registers to x's dtype."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo, k_hi = _k_range(K, SPLIT_K, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn64 = rn.to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    rk = k_lo + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
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
        mask_k = _k_mask(rk, K, EVEN_K, BLOCK_K)
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
        if SCALE_AFTER_DOT:  # only with ALIGNED and not TRANS (s is [BLOCK_N, 1]); q is exact in x's dtype
            acc += tl.dot(q.to(dt), tl.trans(xt.to(dt)), input_precision=PRECISION, out_dtype=tl.float32) * s
        else:  # scale first (fp32); a 16-bit x gets the weight as hi + lo parts: two dots, ~fp32-accurate
            w32 = _i8_to_f32(q) * s
            w = w32.to(dt)
            acc = tl.dot(w, tl.trans(xt.to(dt)), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
            if dt != tl.float32:
                w_lo = (w32 - w.to(tl.float32)).to(dt)
                acc = tl.dot(w_lo, tl.trans(xt.to(dt)), acc=acc, input_precision=PRECISION, out_dtype=tl.float32)
        rk += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += w_step
    _store_result(y_ptr, p_ptr, tl.trans(acc), rm, rn, M, N, SPLIT_K)


# -- launch: configs, pruning, dispatch (shared with kernels/int4.py) ---------------------------------------------

def _config(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


def gemv_configs(trans, wbits):
    """GEMV tiles: >= 16 contiguous bytes per thread along W's contiguous axis, a few KB of weight per step,
    <= 64 fp32 accumulators per thread (checked in the pruner, which also picks SPLIT_K and drops tiles that
    do not fit the group)."""
    if _INTERPRET:
        return [_config(4, 1, BLOCK_N=64, BLOCK_K=32, SPLIT_K=2)] if trans else \
            [_config(4, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)]
    if trans:  # (BLOCK_K, BLOCK_N, warps): BLOCK_N contiguous, divides G
        tiles = [(32, 128, 4), (64, 128, 4), (32, 64, 4), (64, 64, 4), (128, 64, 4), (128, 128, 8)]
        if wbits == 4:
            tiles += [(128, 128, 4)]
        return [_config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s) for bk, bn, w in tiles for s in _SPLITS]
    tiles = [(32, 128, 4), (64, 128, 4), (16, 128, 4), (16, 256, 4), (32, 64, 4), (64, 64, 4), (128, 64, 8)]  # BN BK w
    if wbits == 4:
        tiles += [(128, 64, 4), (256, 64, 8)]
    return [_config(w, 1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s) for bn, bk, w in tiles for s in _SPLITS]


def mm_configs(trans):
    """Tensor-core tiles (BLOCK_N = weight rows = the MMA's M side, BLOCK_M = tokens). Decode: BLOCK_M 16/32/64 with
    split-K. Prefill: 64-256 x 64-256 x 64-128 tiles, 4-8 warps, 3-4 stages (Triton's matmul tutorial, gemlite),
    sized so that the fp32 accumulator plus the per-step dot result (SCALE_AFTER_DOT) or the hi/lo weight tiles
    (transpose) stay in registers (sm_90 compiles of these tiles: <= 245 registers, no spills). Pruned by M, by the
    group (BLOCK_K resp. BLOCK_N divides G) and by shared memory. transpose=False scales after each dot (exact);
    transpose=True scales the weight tile first, in two dots for 16-bit x (hi + lo parts, ~fp32-accurate)."""
    post = 0 if trans else 1
    if _INTERPRET:
        return [_config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32 if trans else 64, SPLIT_K=2, SCALE_AFTER_DOT=post)]
    out = []
    # decode, (BLOCK_N, BLOCK_K, warps, stages, BLOCK_Ms): tiles whose sm_90 compile spills are left out
    decode = [(64, 64, 4, 4, (16, 32, 64)), (128, 64, 4, 4, (16, 32, 64)),
              (64, 128, 4, 3, (16, 32, 64) if post else (16,)), (128, 128, 4, 3, (16, 32) if post else ())]
    # fp32 x without TF32 ("ieee"): tl.dot runs on FMA units; BLOCK_K <= 32 keeps its operands in registers
    fma_decode = [(64, 32, 4, 3, (16, 32))]
    for bn, bk, w, st, bms in decode + fma_decode:
        for bm in bms:
            for s in _SPLITS[:4]:
                out.append(_config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, SCALE_AFTER_DOT=post))
    prefill = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    prefill += [(256, 64, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 128, 8, 3)] if post else [(64, 64, 64, 4, 4)]
    prefill += [(64, 64, 16, 4, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3)]  # FMA (ieee) tiles
    for bm, bn, bk, w, st in prefill:  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        out.append(_config(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, SCALE_AFTER_DOT=post))
    return out


_DEVICE_INFO = {}


def _device_info(device):
    """(SM count, max shared memory per block in bytes) of a CUDA device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        sms = torch.cuda.get_device_properties(idx).multi_processor_count
        try:
            smem = triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"]
        except Exception:  # noqa: BLE001 - an older/newer driver API: assume an H100's 227 KB
            smem = 232448
        _DEVICE_INFO[idx] = (sms, smem)
    return _DEVICE_INFO[idx]


def _pick_splits(configs, tiles, k_steps, sms, key):
    """Per tile shape (``key(config)``), the SPLIT_K values worth timing: the smallest giving >= 2 programs per SM
    and twice that, with >= 2 K steps per split."""
    chosen = {}
    for c in configs:
        chosen.setdefault(key(c), []).append(c)
    out = []
    for group in chosen.values():
        t, steps = tiles(group[0]), k_steps(group[0])
        ok = [c for c in group if c.kwargs["SPLIT_K"] == 1 or steps >= 2 * c.kwargs["SPLIT_K"]]
        if not ok:
            continue
        enough = [c for c in ok if t * c.kwargs["SPLIT_K"] >= 2 * sms] or [ok[-1]]
        first = enough[0].kwargs["SPLIT_K"]
        out += [c for c in ok if c.kwargs["SPLIT_K"] in (first, 2 * first)]
    return out


def make_gemv_pruner(trans):
    def prune(configs, named_args, **kwargs):
        n, k, g = named_args["N"], named_args["K"], named_args["G"]
        bm = kwargs["BLOCK_M"]
        sms, _ = _device_info(named_args["x_ptr"].device)
        fit = [c for c in configs
               if g % (c.kwargs["BLOCK_N"] if trans else c.kwargs["BLOCK_K"]) == 0
               and bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
        out = _pick_splits(fit, lambda c: cdiv(n, c.kwargs["BLOCK_N"]),
                           lambda c: cdiv(k, c.kwargs["BLOCK_K"]), sms,
                           lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps))
        return out or fit[:1] or configs[:1]
    return prune


def make_mm_pruner(trans, wbits):
    def prune(configs, named_args, **kwargs):
        m, n, k, g = named_args["M"], named_args["N"], named_args["K"], named_args["G"]
        x = named_args["x_ptr"]
        sms, smem = _device_info(x.device)
        mb = next_pow2(m)
        decode = m <= SPLIT_MAX_M
        fma = kwargs["PRECISION"] == "ieee" and x.dtype == torch.float32  # BLOCK_K <= 32 configs, else >= 64
        fit = []
        for c in configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            if g % (bn if trans else bk) or (bk <= 32) != fma:
                continue
            if decode:  # one BLOCK_M: the token count rounded up to 16, 32 or 64 (FMA tiles: 16 or 32)
                if bm != min(max(mb, 16), 32 if fma else 64):
                    continue
            elif c.kwargs["SPLIT_K"] > 1 or bm < 64 or bm > max(mb, 64):
                continue
            # pipelined x and weight tiles + one dequantized tile (+ layout conversions) must fit
            need = c.num_stages * (bm * bk * x.element_size() + bn * bk * wbits // 8) + bn * bk * x.element_size()
            if need > smem:
                continue
            fit.append(c)
        if not decode:
            return fit or configs[-1:]
        out = _pick_splits(fit, lambda c: cdiv(n, c.kwargs["BLOCK_N"]) * cdiv(m, c.kwargs["BLOCK_M"]),
                           lambda c: cdiv(k, c.kwargs["BLOCK_K"]), sms,
                           lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                      c.num_stages))
        return out or fit[:1] or configs[:1]
    return prune


TUNE_KEY = ["MB", "N", "K", "G", "PRECISION"]


def _largest_divisor(g, choices):
    return next((c for c in choices if g % c == 0), None)


def dequant_matmul(gemv_kernel, mm_kernel, tuners, x, wargs, y, N, K, G, transpose, aligned):
    """Launch one of the two kernels (see the section comment) for x (M x K) and a weight given by ``wargs``
    (the kernel's weight pointers), writing y (M x N). ``tuners`` = (gemv, gemv_t, mm, mm_t) autotuners of the two
    kernels; ``aligned``: the weight layout allows the one-scale-per-row/per-k paths (INT4: groups within rows)."""
    M = x.shape[0]
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    mb = next_pow2(M)
    tune = aligned and G % TUNE_GROUP == 0 and N * K >= TUNE_MIN_WEIGHT
    args = (x, *wargs, y)
    even_k = lambda bk: K % bk == 0  # noqa: E731
    tail = (M, N, K, G, x.stride(0), x.stride(1))
    if M <= GEMV_MAX_M:
        tuner = tuners[1] if transpose else tuners[0]
        meta = dict(TRANS=transpose, BLOCK_M=mb)
        grid = lambda c: (cdiv(N, c["BLOCK_N"]), c["SPLIT_K"])  # noqa: E731
    else:
        tuner = tuners[3] if transpose else tuners[2]
        meta = dict(TRANS=transpose, PRECISION=precision)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:  # interpreter (see DOT_F32)
            meta.update(DOT_F32=True, PRECISION="ieee")
        grid = lambda c: (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]), c["SPLIT_K"])  # noqa: E731
    if tune:
        may_split = M <= SPLIT_MAX_M or len(tuner.configs) == 1
        max_split = max(c.kwargs["SPLIT_K"] for c in tuner.configs) if may_split else 1
        part = torch.empty((max_split, M, N), dtype=torch.float32, device=x.device) if max_split > 1 else y
        # every tuned BLOCK_K divides 128 (and G when ALIGNED)
        tuner[grid](*args, part, *tail, mb, ALIGNED=True, EVEN_K=even_k(128), **meta)  # SPLIT_K: from the config
        split = tuner.best_config.kwargs["SPLIT_K"]
    else:  # one config; ALIGNED when the group allows a tile that divides it
        if M <= GEMV_MAX_M:
            if transpose:
                bn = _largest_divisor(G, (64, 32, 16)) if aligned else None
                cfg = dict(BLOCK_N=bn or 32, BLOCK_K=max(16, min(64, 4096 // (mb * (bn or 32)))))
            else:
                bk = _largest_divisor(G, (128, 64, 32, 16)) if aligned else None
                cfg = dict(BLOCK_K=bk or 32, BLOCK_N=max(8, min(64, 4096 // (mb * (bk or 32)))))
            ok = (bn if transpose else bk) is not None
        else:
            fma = precision == "ieee" and x.dtype == torch.float32  # FMA dot: small tiles (sm_90: no spills)
            bm = min(max(mb, 16), 32 if fma else 64)
            if transpose:
                bn = _largest_divisor(G, (64, 32, 16)) if aligned else None
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn or 64, BLOCK_K=16 if fma else 32, SCALE_AFTER_DOT=False)
                ok = bn is not None
            else:
                bk = _largest_divisor(G, (16,) if fma else (64, 32, 16)) if aligned else None
                ok = bk is not None
                cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk or (16 if fma else 32), SCALE_AFTER_DOT=ok)
        kernel = gemv_kernel if M <= GEMV_MAX_M else mm_kernel
        grid_size = grid(dict(cfg, SPLIT_K=1))
        kernel[grid_size](*args, y, *tail, mb, 1, ALIGNED=ok, EVEN_K=even_k(cfg["BLOCK_K"]), **meta, **cfg, num_warps=4,
                          num_stages=1 if M <= GEMV_MAX_M else 2)
        split, part = 1, y
    if split > 1:
        mn = M * N
        _splitk_sum_kernel[(cdiv(mn, 1024),)](part, y, mn, split, BLOCK=1024, num_warps=4)
    return y


GEMV_KEY = ["MB", "N", "K", "G"]
MM_KEY = ["MB", "N", "K", "G", "PRECISION"]
# The autotuners (module-level: bench/gpu_report.py prints the configs they chose).
int8_gemv_autotune = triton.autotune(
    gemv_configs(False, 8), key=GEMV_KEY,
    prune_configs_by={"early_config_prune": make_gemv_pruner(False)})(_int8_gemv_kernel)
int8_gemv_t_autotune = triton.autotune(
    gemv_configs(True, 8), key=GEMV_KEY,
    prune_configs_by={"early_config_prune": make_gemv_pruner(True)})(_int8_gemv_kernel)
int8_mm_autotune = triton.autotune(mm_configs(False), key=MM_KEY,
                                   prune_configs_by={"early_config_prune": make_mm_pruner(False, 8)})(_int8_mm_kernel)
int8_mm_t_autotune = triton.autotune(mm_configs(True), key=MM_KEY,
                                     prune_configs_by={"early_config_prune": make_mm_pruner(True, 8)})(_int8_mm_kernel)
_INT8_TUNERS = (int8_gemv_autotune, int8_gemv_t_autotune, int8_mm_autotune, int8_mm_t_autotune)


def int8_matmul_triton(x, w_q, scale, group_size, transpose):
    """y = x @ dequant(w_q)^T (or x @ dequant(w_q) with ``transpose``) for a 2-D x; see the section comment."""
    out_f, in_f = w_q.shape
    n, k = (in_f, out_f) if transpose else (out_f, in_f)
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    return dequant_matmul(_int8_gemv_kernel, _int8_mm_kernel, _INT8_TUNERS, x, (w_q, scale), y, n, k, group_size,
                          bool(transpose), aligned=True)


@triton.jit
def _int8_sr_update_kernel(q_ptr, scale_ptr, delta_ptr, group_size, decay, seed, offset, BLOCK: tl.constexpr):
    """General case, one program per group: w = (q * s + delta) * decay, s' = max(max|w| / 127, FLT_MIN),
    q' = SR(w / s'); one Philox evaluation per element (any group size and offset)."""
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


def _sr_update_configs():
    if _INTERPRET:
        return [triton.Config({"G": 2}, num_warps=4)]
    return [triton.Config({"G": g}, num_warps=w) for g in (2, 4, 8, 16, 32) for w in (4, 8)]


def _sr_update_prune(configs, named_args, **kwargs):
    gs = named_args["GS"] if "GS" in named_args else kwargs.get("GS", 128)
    kept = [c for c in configs if 256 <= c.kwargs["G"] * gs <= 8192]
    return kept or configs[:1]


@triton.autotune(configs=_sr_update_configs(), key=["n_groups", "GS"], restore_value=["q_ptr", "scale_ptr"],
                 prune_configs_by={"early_config_prune": _sr_update_prune})
@triton.jit
def _int8_sr_update_tiled_kernel(q_ptr, scale_ptr, delta_ptr, n_groups, decay, seed, offset, GS: tl.constexpr,
                                 G: tl.constexpr):
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
    tl.store(q_ptr + idx, v.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, ns, mask=rmask)


def int8_sr_update_triton(w_q, scale, delta, group_size, decay, seed, offset):
    groups = scale.numel()
    if group_size >= 4 and group_size & (group_size - 1) == 0 and offset % 4 == 0:
        def grid(meta):
            return (cdiv(groups, meta["G"]),)

        _int8_sr_update_tiled_kernel[grid](w_q, scale, delta, groups, float(decay), seed, offset, GS=group_size,
                                           enable_fp_fusion=False)
        return
    block = next_pow2(group_size)
    _int8_sr_update_kernel[(groups,)](w_q, scale, delta, group_size, float(decay), seed, offset, BLOCK=block,
                                      enable_fp_fusion=False)
