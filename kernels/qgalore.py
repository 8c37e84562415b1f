"""Triton kernels of Q-GaLore's optimizer step (spec: weightkit.ops.qgalore, weightkit.ops.moments8bit).

int8_sr_lowrank_update_: one program per [BLOCK_M, BLOCK_N] tile of the int8 weight, BLOCK_N a multiple of the
weight's group size (a tile holds whole groups: the new absmax scale of a group is taken over its whole updated
weight). The tile of N = P U (left) or U P (right) is accumulated over the rank in BLOCK_R steps with ``tl.dot``
(float32 accumulation; 'fp32' = IEEE products, 'tf32x3' = three TF32 tensor-core products (near-float32
accuracy; IEEE in the interpreter), 'bf16' = operands rounded to bfloat16, the tensor-core path;
the interpreter, whose bf16 dot is wrong in Triton 3.9, multiplies the rounded values in float32: the same exact
products; 'bf16x3' = three bf16 tensor-core products of the basis' exact integers q - z with a three-part bf16
split of U, the scales applied in float32 outside them: _lowrank_tile's SPLIT3), the
INT4 basis tile unpacked and dequantized in registers ((q - z) * s, one rounding, as the spec): read as packed-byte
rows with one (scale, zero) load per group where the basis rows are whole power-of-two groups (basis_aligned),
value by value otherwise. N = U P accumulates transposed (P^T U^T: the dequantized tile as the dot's first operand;
as the second, its register layout spilled kilobytes a thread on sm_90). The epilogue reads the int8 tile and its
scales (one load a group), forms w = (q * s + (-alpha) * N) * decay, reduces |w| per group ([G, GS] view), rounds
stochastically with the Philox stream of weightkit.ops.rng (four values per Philox evaluation when the stream
position of every row start is a multiple of 4, one per element otherwise) and writes int8 values and scales. The
m x n float weight and N exist only tile by tile. Launched with enable_fp_fusion=False: the spec rounds every
product and sum separately.
"""

import torch
import triton
import triton.language as tl

from ._shared import INTERPRET as _INTERPRET
from ._shared import (_u24, capturing, cdiv, dequant_int4, dequant_int4_tile, device_guard, dot3, group_broadcast,
                      int4_tile_parts, launch, next_pow2, philox_uniform, round_bf16, unless_found)

# A constexpr: compiled kernels may read no other module global (Triton 3.6 and 3.9 refuse a plain float with a
# NameError; the interpreter accepts it, so only an sm_90 compile showed it).
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _philox_tile(start, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] uniforms, row i holding stream positions start[i] + 0..BLOCK_N-1 (start[i] % 4 == 0)."""
    counter = (start[:, None] + 4 * tl.arange(0, BLOCK_N // 4)[None, :]) >> 2
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero, 10)
    # join(join(a, c), join(b, d))[..., k, j] = (a, b, c, d)[2k + j]: lanes 0..3 in stream order
    u = tl.join(tl.join(_u24(r0), _u24(r2)), tl.join(_u24(r1), _u24(r3)))
    return tl.reshape(u, (BLOCK_M, BLOCK_N))


@triton.jit
def _lowrank_tile(bq_ptr, bs_ptr, bz_ptr, u_ptr, M, N, R, basis_row_bytes, LEFT: tl.constexpr, PG: tl.constexpr,
                  ALIGNED: tl.constexpr, BF16: tl.constexpr, TC_BF16: tl.constexpr, SPLIT3: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """(acc, pid_n, rows, cols, rmask, cmask): the program's [BLOCK_M, BLOCK_N] tile (rows x cols, program ids
    (0, 1) = (row tile, column tile)) of N = P U (LEFT) or U P, float32 (module docstring).

    SPLIT3 ('bf16x3', ALIGNED only): the basis as its exact integers q - z with the scales applied in float32 outside
    the tensor-core products (dot3), U split in three bf16 parts. Left (P: M x R, groups along R, BLOCK_R <= PG): a
    rank step lies in one group of each row, so its product is scaled per row after the dot. Right (P: R x N, groups
    along N): the scale of row k and column group g multiplies U's column k, per group (a product per group for 1, 2
    or 4 groups a tile; a batched [NG, PG, BLOCK_M] product for more)."""
    pid_n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    NG: tl.constexpr = BLOCK_N // PG if BLOCK_N >= PG else 1
    GW: tl.constexpr = BLOCK_N // NG  # columns of a group in the tile
    # N = P U accumulates as [BLOCK_M, BLOCK_N]; N = U P as its transpose (P^T U^T), with the dequantized basis as
    # the dot's first operand: as the second, its in-register layout spilled kilobytes per thread (sm_90 compiles);
    # SPLIT3 right: by groups of columns, [GW, BLOCK_M] each: in acc0..acc3 for 1, 2 or 4 groups a tile (2-D
    # products: Hopper's wgmma), else batched as [NG, GW, BLOCK_M] in acc (a 3-D tl.dot: mma.sync)
    UNROLL: tl.constexpr = SPLIT3 and not LEFT and NG <= 4
    acc = tl.zeros((BLOCK_M, BLOCK_N) if LEFT else ((NG, GW, BLOCK_M) if SPLIT3 and not UNROLL else
                                                     ((1, 1) if UNROLL else (BLOCK_N, BLOCK_M))), dtype=tl.float32)
    acc0 = tl.zeros((GW, BLOCK_M) if UNROLL else (1, 1), dtype=tl.float32)
    acc1 = tl.zeros((GW, BLOCK_M) if UNROLL and NG >= 2 else (1, 1), dtype=tl.float32)
    acc2 = tl.zeros((GW, BLOCK_M) if UNROLL and NG == 4 else (1, 1), dtype=tl.float32)
    acc3 = tl.zeros((GW, BLOCK_M) if UNROLL and NG == 4 else (1, 1), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        kmask = ks < R
        if LEFT:  # N = P U: P (M x R) rows x ks, U (R x N) ks x cols
            bmask = kmask[:, None] & cmask[None, :]
            b = tl.load(u_ptr + ks[:, None] * N + cols[None, :], mask=bmask, other=0.0)
            if SPLIT3:  # one group of each row: s is [BLOCK_M, 1]
                qz, s = int4_tile_parts(bq_ptr, bs_ptr, bz_ptr, rows, rmask, k0, R, basis_row_bytes, PG, BLOCK_M,
                                        BLOCK_R)
                acc += dot3(qz, b, TC_BF16) * s
            else:
                if ALIGNED:
                    a = dequant_int4_tile(bq_ptr, bs_ptr, bz_ptr, rows, rmask, k0, R, basis_row_bytes, PG, BLOCK_M,
                                          BLOCK_R)
                else:
                    amask = rmask[:, None] & kmask[None, :]
                    a = dequant_int4(bq_ptr, bs_ptr, bz_ptr, rows[:, None] * R + ks[None, :], PG, amask)
                acc = _plain_dot(acc, a, b, BF16, TC_BF16, DOT_PRECISION)
        else:  # N = U P: U (M x R) rows x ks, P (R x N) ks x cols
            amask = rmask[:, None] & kmask[None, :]
            a = tl.load(u_ptr + rows[:, None] * R + ks[None, :], mask=amask, other=0.0)
            if SPLIT3:
                qz, s = int4_tile_parts(bq_ptr, bs_ptr, bz_ptr, ks.to(tl.int64), kmask, pid_n * BLOCK_N, N,
                                        basis_row_bytes, PG, BLOCK_R, BLOCK_N)  # s: [BLOCK_R, NG]
                ut = tl.trans(a)  # [BLOCK_R, BLOCK_M]
                qzt = tl.trans(qz)  # [BLOCK_N, BLOCK_R]
                if NG == 1:
                    acc0 += dot3(qzt, ut * s, TC_BF16)
                elif NG == 2:  # the tile's two column groups as [GW, BLOCK_R] each, their scales [BLOCK_R] each
                    q0, q1 = tl.split(tl.permute(tl.reshape(qzt, (2, GW, BLOCK_R)), (1, 2, 0)))
                    s0, s1 = tl.split(s)
                    acc0 += dot3(q0, ut * s0[:, None], TC_BF16)
                    acc1 += dot3(q1, ut * s1[:, None], TC_BF16)
                elif NG == 4:  # group 2i + j: split j, then i
                    qa, qb = tl.split(tl.reshape(tl.permute(tl.reshape(qzt, (4, GW, BLOCK_R)), (1, 2, 0)),
                                                 (GW, BLOCK_R, 2, 2)))
                    q0, q2 = tl.split(qa)
                    q1, q3 = tl.split(qb)
                    sa, sb = tl.split(tl.reshape(s, (BLOCK_R, 2, 2)))
                    s0, s2 = tl.split(sa)
                    s1, s3 = tl.split(sb)
                    acc0 += dot3(q0, ut * s0[:, None], TC_BF16)
                    acc1 += dot3(q1, ut * s1[:, None], TC_BF16)
                    acc2 += dot3(q2, ut * s2[:, None], TC_BF16)
                    acc3 += dot3(q3, ut * s3[:, None], TC_BF16)
                else:
                    qz3 = tl.reshape(qzt, (NG, GW, BLOCK_R))
                    acc += dot3(qz3, ut[None, :, :] * tl.trans(s)[:, :, None], TC_BF16)
            else:
                if ALIGNED:
                    b = dequant_int4_tile(bq_ptr, bs_ptr, bz_ptr, ks.to(tl.int64), kmask, pid_n * BLOCK_N, N,
                                          basis_row_bytes, PG, BLOCK_R, BLOCK_N)
                else:
                    bmask = kmask[:, None] & cmask[None, :]
                    b = dequant_int4(bq_ptr, bs_ptr, bz_ptr, ks[:, None] * N + cols[None, :], PG, bmask)
                acc = _plain_dot(acc, tl.trans(b), tl.trans(a), BF16, TC_BF16, DOT_PRECISION)
    if LEFT:
        return acc, pid_n, rows, cols, rmask, cmask
    if UNROLL:  # the groups' [GW, BLOCK_M] slabs, in column order, as [BLOCK_N, BLOCK_M]
        if NG == 1:
            acc = acc0
        elif NG == 2:
            acc = tl.reshape(tl.permute(tl.join(acc0, acc1), (2, 0, 1)), (BLOCK_N, BLOCK_M))
        else:  # [GW, BLOCK_M, j, i] for group 2i + j
            acc = tl.join(tl.join(acc0, acc1), tl.join(acc2, acc3))
            acc = tl.reshape(tl.permute(acc, (3, 2, 0, 1)), (BLOCK_N, BLOCK_M))
    return tl.trans(tl.reshape(acc, (BLOCK_N, BLOCK_M))), pid_n, rows, cols, rmask, cmask


@triton.jit
def _plain_dot(acc, a, b, BF16: tl.constexpr, TC_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a . b at precision 'fp32' / 'tf32x3' (DOT_PRECISION) or 'bf16' (BF16: operands rounded to bf16)."""
    if BF16:
        a = round_bf16(a)
        b = round_bf16(b)
    if TC_BF16:  # exact casts of bf16-representable values; tensor cores, float32 accumulation
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc, out_dtype=tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)


@triton.jit
def _int8_sr_lowrank_update_kernel(wq_ptr, ws_ptr, bq_ptr, bs_ptr, bz_ptr, u_ptr, found_ptr, step_ptr, M, N, R,
                                   basis_row_bytes, alpha, decay, seed, offset, HAS_FOUND: tl.constexpr,
                                   HAS_STEP: tl.constexpr, LEFT: tl.constexpr, GS: tl.constexpr, PG: tl.constexpr,
                                   ALIGNED: tl.constexpr, BF16: tl.constexpr, TC_BF16: tl.constexpr,
                                   SPLIT3: tl.constexpr, DOT_PRECISION: tl.constexpr, RNG4: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    acc, pid_n, rows, cols, rmask, cmask = _lowrank_tile(
        bq_ptr, bs_ptr, bz_ptr, u_ptr, M, N, R, basis_row_bytes, LEFT, PG, ALIGNED, BF16, TC_BF16, SPLIT3,
        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    # epilogue: the tile's groups, [G, GS] with G = BLOCK_M * BLOCK_N / GS (a row of the tile holds whole groups)
    GPR: tl.constexpr = BLOCK_N // GS  # groups per tile row
    G: tl.constexpr = BLOCK_M * GPR
    mask = rmask[:, None] & cmask[None, :]
    idx = rows[:, None] * N + cols[None, :]
    q = tl.load(wq_ptr + idx, mask=mask, other=0).to(tl.float32)
    gcols = pid_n * GPR + tl.arange(0, GPR)
    sidx = rows[:, None] * (N // GS) + gcols[None, :]
    smask = rmask[:, None] & (gcols[None, :] < N // GS)
    s = group_broadcast(tl.load(ws_ptr + sidx, mask=smask, other=0.0), BLOCK_M, GPR, BLOCK_N)  # one load a group
    if HAS_STEP:  # the step size counted on the device: alpha * step_size_t, one float32 product
        alpha = alpha * tl.load(step_ptr)
    w = (q * s + acc * (-alpha)) * decay
    w = tl.where(mask, w, 0.0)
    wg = tl.reshape(w, (G, GS))
    amax = tl.max(tl.abs(wg), axis=1)
    ns = tl.maximum(tl.math.div_rn(amax, 127.0), _FLT_MIN)
    inv = tl.math.div_rn(tl.full([G], 1.0, tl.float32), ns)
    if RNG4:
        u = _philox_tile(offset + rows * N + pid_n * BLOCK_N, seed, BLOCK_M, BLOCK_N)
    else:
        u = philox_uniform(offset + idx, seed)
    v = tl.floor(wg * inv[:, None] + tl.reshape(u, (G, GS)))
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    tl.store(wq_ptr + idx, tl.reshape(v, (BLOCK_M, BLOCK_N)).to(tl.int8), mask=unless_found(mask, found_ptr, HAS_FOUND))
    tl.store(ws_ptr + tl.reshape(sidx, (G,)), ns, mask=unless_found(tl.reshape(smask, (G,)), found_ptr, HAS_FOUND))


def tile_config(m, n, r, group_size, precision, split3_group=None):
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps) for a weight: BLOCK_N a power-of-two multiple of the group (>= 64
    columns where the weight has them), tiles of about 8192 values on 8 warps (32 accumulators a thread), BLOCK_R
    >= 16 (tl.dot's minimum), halved for groups of 512 so shared memory stays under sm_90's 227 KB a block;
    ``split3_group``: a left basis' group for 'bf16x3' (a rank step stays in one group: BLOCK_R <= it).
    Checked by sm_90 compiles (tests/ops/test_kernels_host.py: registers, spills and shared memory of each)."""
    block_n = max(group_size, min(128, next_pow2(n)))
    if _INTERPRET:
        return 16, block_n, 16, 4
    block_m = max(16, min(64, 8192 // block_n))
    block_r = 64 if precision == "bf16" else 32
    if block_n >= 512:
        block_r //= 2
    if split3_group is not None:
        block_r = min(block_r, split3_group)
    block_r = max(16, min(block_r, next_pow2(r)))
    return block_m, block_n, block_r, 8 if block_m * block_n >= 8192 else 4


def split3_applies(left: bool, aligned: bool, proj_group_size: int) -> bool:
    """Whether 'bf16x3' runs as such (kernel docstring: SPLIT3): on a packed-byte basis (aligned) whose groups hold at
    least 16 values (tl.dot's minimum: a left rank step of one group, or a right product's rows of one group).
    Otherwise the kernel computes 'bf16x3' as 'tf32x3' (the same accuracy contract, near float32)."""
    return aligned and proj_group_size >= 16


def basis_aligned(row_len: int, proj_group_size: int) -> bool:
    """Whether the INT4 basis tiles load as packed bytes with one (scale, zero) per group (_shared.dequant_int4_tile):
    its rows (row_len values: R for a left basis, N for a right one) are whole groups of a power-of-two size >= 2.
    Otherwise (odd ranks or groups) each value is gathered from its flat index (dequant_int4)."""
    pg = proj_group_size
    return pg >= 2 and pg & (pg - 1) == 0 and row_len % pg == 0


MAX_GROUP = 512  # a [16, 1024] tile needs more than sm_90's 227 KB of shared memory a block


def supports(group_size: int) -> bool:
    """Whether the tile kernel takes this int8 group size (a power of two, at most MAX_GROUP columns per tile)."""
    return 1 <= group_size <= MAX_GROUP and group_size & (group_size - 1) == 0


def int8_sr_lowrank_update_triton(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size,
                                  left, alpha, decay, precision, seed, offset, found_inf=None, step_size_t=None):
    m, n = w_q.shape
    r = update.shape[0] if left else update.shape[1]
    if not supports(group_size):
        raise ValueError(f"the Triton int8_sr_lowrank_update_ needs a power-of-two group_size <= {MAX_GROUP}, got "
                         f"{group_size} (use the cpu/cuda backend)")
    meta, grid = _kernel_args(m, n, r, group_size, proj_group_size, left, precision)
    rng4 = offset % 4 == 0 and n % 4 == 0 and meta["BLOCK_N"] >= 4
    with device_guard(w_q.device):
        _int8_sr_lowrank_update_kernel[grid](
            w_q, scale, ortho_q, ortho_scale, ortho_zero, update, scale if found_inf is None else found_inf,
            scale if step_size_t is None else step_size_t, m, n, r, (r if left else n) // 2, float(alpha),
            float(decay), seed, offset, HAS_FOUND=found_inf is not None, HAS_STEP=step_size_t is not None,
            GS=group_size, RNG4=rng4, **meta)


@triton.jit
def _lowrank_product_kernel(out_ptr, bq_ptr, bs_ptr, bz_ptr, u_ptr, M, N, R, basis_row_bytes, LEFT: tl.constexpr,
                            PG: tl.constexpr, ALIGNED: tl.constexpr, BF16: tl.constexpr, TC_BF16: tl.constexpr,
                            SPLIT3: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """N itself, tile by tile as the write-back computes it (_lowrank_tile), stored as float32: for the precision
    measurements (tests, bench/qgalore_fused.py); the optimizer never materializes N."""
    acc, pid_n, rows, cols, rmask, cmask = _lowrank_tile(
        bq_ptr, bs_ptr, bz_ptr, u_ptr, M, N, R, basis_row_bytes, LEFT, PG, ALIGNED, BF16, TC_BF16, SPLIT3,
        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def _kernel_args(m, n, r, group_size, proj_group_size, left, precision):
    """(meta-parameters, grid) of the write-back's product for an m x n weight at ``precision``."""
    aligned = basis_aligned(r if left else n, proj_group_size)
    split3 = precision == "bf16x3" and split3_applies(left, aligned, proj_group_size)
    if precision == "bf16x3" and not split3:
        precision = "tf32x3"
    block_m, block_n, block_r, warps = tile_config(m, n, r, group_size, precision,
                                                   proj_group_size if split3 and left else None)
    meta = dict(LEFT=bool(left), PG=proj_group_size, ALIGNED=aligned, BF16=precision == "bf16",
                TC_BF16=precision in ("bf16", "bf16x3") and not _INTERPRET, SPLIT3=split3,
                DOT_PRECISION="tf32x3" if precision == "tf32x3" and not _INTERPRET else "ieee",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, enable_fp_fusion=False)
    return meta, (cdiv(m, block_m), cdiv(n, block_n))


def lowrank_product_triton(ortho_q, ortho_scale, ortho_zero, update, proj_group_size, m, n, left, precision,
                           group_size=128):
    """N = P U (left: update r x n) or U P (update m x r), float32, m x n, computed by the write-back's tiles for an
    int8 weight of ``group_size`` (its BLOCK_N): what ``int8_sr_lowrank_update_`` adds to the weight, by itself."""
    r = update.shape[0] if left else update.shape[1]
    meta, grid = _kernel_args(m, n, r, group_size, proj_group_size, left, precision)
    with device_guard(update.device):
        out = torch.empty(m, n, dtype=torch.float32, device=update.device)
        _lowrank_product_kernel[grid](out, ortho_q, ortho_scale, ortho_zero, update, m, n, r,
                                      (r if left else n) // 2, **meta)
    return out


# ---------------------------------------------------------------------------------------------------------
# blockwise8bit_adam_ (spec: weightkit.ops.moments8bit): one program per block of 256 elements.

@triton.jit
def _nearest_code(x, bounds_ptr):
    """The number of the 255 sorted midpoints strictly below ``x`` (torch.bucketize), by an 8-step binary search; a
    NaN is above every midpoint (255), as torch.bucketize puts it: the test is "not (midpoint >= x)"."""
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for step in tl.static_range(8):
        width = 128 >> step
        probe = tl.load(bounds_ptr + idx + (width - 1))
        idx = tl.where(probe >= x, idx, idx + width)
    return idx


@triton.jit
def _requantize(x, mask, keep, bounds_ptr, q_ptr, absmax_ptr, offs, block):
    """Codes and absmax of the block's new values ``x`` (``mask``: the block's elements), stored where ``keep``."""
    ax = tl.where(mask, tl.abs(x), 0.0)
    absmax = tl.max(ax, axis=0)
    # NaN as the spec's amax, clamp_min and clamp give it (Triton's max and maximum drop a NaN by default): a NaN in
    # the block makes absmax NaN (the block's sum is NaN then), and so every code 255 (see _nearest_code)
    absmax = tl.where(tl.max((ax != ax).to(tl.int32), axis=0) > 0, tl.sum(ax, axis=0), absmax)
    # 1e-38 is below float32's smallest normal, so a bare literal is typed fp64 and so is the maximum; div_rn then
    # fails to compile in Triton 3.6 ("Expected dtype ['fp32'] but got fp64"; 3.9 accepts it). A float32 constant
    # is the spec's clamp_min(1e-38) on a float32 tensor in both versions.
    inv = tl.math.div_rn(1.0, tl.maximum(absmax, tl.full([], 1e-38, tl.float32), propagate_nan=tl.PropagateNan.ALL))
    scaled = tl.minimum(tl.maximum(x * inv, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                        propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs, _nearest_code(scaled, bounds_ptr).to(tl.uint8), mask=tl.where(keep, mask, False))
    tl.store(absmax_ptr + block, absmax, mask=keep)


@triton.jit
def _blockwise8bit_adam_kernel(g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, code_s_ptr, code_u_ptr, bounds_s_ptr,
                               bounds_u_ptr, out_ptr, found_ptr, n, beta1, beta2, one_minus_beta1, one_minus_beta2,
                               eps, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """HAS_FOUND: where the step's flag is set, the moments are not written and the direction is 0."""
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    keep = unless_found(block >= 0, found_ptr, HAS_FOUND)  # a scalar: the whole step's verdict
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(code_s_ptr + mq) * tl.load(ma_ptr + block)
    v = tl.load(code_u_ptr + vq) * tl.load(va_ptr + block)
    m = m * beta1 + g * one_minus_beta1  # (1 - beta) in double, then float32, as torch's scalar
    v = v * beta2 + (g * g) * one_minus_beta2
    tl.store(out_ptr + offs, tl.where(keep, tl.math.div_rn(m, tl.sqrt_rn(v) + eps), 0.0), mask=mask)
    _requantize(m, mask, keep, bounds_s_ptr, mq_ptr, ma_ptr, offs, block)
    _requantize(v, mask, keep, bounds_u_ptr, vq_ptr, va_ptr, offs, block)


_MIDPOINTS = {}  # id(code) -> (code, its version, its 255 midpoints): the optimizers pass the same code tables each step


def _midpoints(code):
    """The decision boundaries of a code table, computed once per table (two launches and an allocation saved per
    call: the optimizer step calls this op once per parameter). The entry holds the table itself, so its id cannot
    be reused while cached, and its version counter, so a table written in place is recomputed. Not cached inside a
    CUDA-graph capture (the tensor would live in the graph's memory pool)."""
    hit = _MIDPOINTS.get(id(code))
    if hit is not None and hit[0] is code and hit[1] == code._version:
        return hit[2]
    bounds = (code[:-1] + code[1:]) / 2
    if code.device.type != "cuda" or not capturing():
        if len(_MIDPOINTS) >= 64:
            _MIDPOINTS.clear()
        _MIDPOINTS[id(code)] = (code, code._version, bounds)
    return bounds


def blockwise8bit_adam_triton(low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed,
                              code_unsigned, out, beta1, beta2, eps, found_inf=None):
    n = low.numel()
    with device_guard(low.device):
        bounds_s = _midpoints(code_signed)
        bounds_u = _midpoints(code_unsigned)
        launch(_blockwise8bit_adam_kernel, (cdiv(n, 256),),
               low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed, code_unsigned, bounds_s,
               bounds_u, out, low if found_inf is None else found_inf, n, float(beta1), float(beta2), 1.0 - beta1,
               1.0 - beta2, float(eps), HAS_FOUND=found_inf is not None, BLOCK=256, num_warps=2 if _INTERPRET else 4,
               enable_fp_fusion=False)
