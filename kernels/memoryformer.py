"""Triton kernels of the MemoryFormer lookup (spec: weightkit.ops.memoryformer).

Shapes: x (n, K * TAU), tables (K, 2^TAU, d_out). Chunk (t, k) of x gives bucket h[t, k] (sign bits), weight
p[t, k] = prod sigmoid(2 |z| / t) and the table row key[t, k] = k * 2^TAU + h[t, k].

Forward, y[t] = sum_k p[t, k] T[key[t, k]] (fp32 accumulation, y in x's dtype):
* grid (token blocks of BLOCK_T, column blocks of BLOCK_N, SPLIT table splits); token blocks vary fastest, so the
  programs resident at one time walk the same tables together and every table slice is shared through L2 by all
  token blocks (the table-major order that matters at large n). Split s owns a contiguous run of tables and loads
  BLOCK_K tables per step as one [BLOCK_T, BLOCK_K, BLOCK_N] gather (many independent loads in flight: one token
  is latency-bound otherwise); the sum over tables is deferred to the end of the loop (pure FMA loop).
* SPLIT == 1 stores y directly; SPLIT > 1 stores fp32 partials [SPLIT, n, d_out] and the tile's last split to
  arrive sums them in split order and casts, in the same launch (kernels/_shared.py's splitk_finish, partials and
  counters from its SCRATCH, as the int8/INT4 matmuls): one kernel per call (a decode token's forward is one
  launch, one graph node), deterministic for a given config.
* Hash (key, p) computed inline per step when n is small (no extra launch; the recomputation per column block is
  a few exp per loaded row), precomputed once per (token, table) by ``_memory_hash_kernel`` when n >= _PRE_MIN_N.
* Autotuned (module-level ``memory_forward_autotuned``, key: n bucket (next power of 2), K, d_out, TAU, PRE and the
  dtypes) for tables of >= _TUNE_MIN_TABLE elements, once per bucket (kernels/_shared.py, Launcher: the call path
  looks up a cached launch plan). Smaller tables, and torch.use_deterministic_algorithms(True) (bits must not depend
  on the timing noise of a tuning run), take a shape rule (``_fwd_default``).

Backward (``memory_backward_autotuned``): a program per (token block, BLOCK_K tables) computes the hash once, loops
over the columns for dot = <g, T[key]> (and, in atomics mode, adds p g into an fp32 table gradient with relaxed fp32
atomics in the same pass), then writes the input gradient. Segment mode (deterministic, and the default otherwise:
weightkit.ops.memoryformer.table_grad_mode(), passed down as ``segments``): the same kernel stores key and p instead
(with a fixed config in deterministic mode, so the input gradient's summation order is fixed too; tuned otherwise);
a counting sort of the keys per table (``_rank_keys_kernel``, one launch; torch.sort + searchsorted above 1024
buckets) gives, for each of the K 2^TAU table rows, its run of tokens in token order; ``memory_segment_autotuned``
sums each row's run sequentially, four entries' loads in flight at a time (order independent of its config), and
writes every row of the table gradient exactly once, in the tables' dtype (no memset, no fp32 copy, no host sync;
extra memory O(n K + K 2^TAU)).

Decode (n <= 16): the forward's pruned candidates split the tables until one token gives >= 2 programs per SM
and keep BLOCK_T * BLOCK_K >= 8 (eight independent row gathers per program step: one token has no other source
of loads in flight); the shape rule (deterministic mode, small tables) does the same.
"""

import functools

import torch
import triton
import triton.language as tl

from ._shared import (INTERPRET, SCRATCH, Launcher, Plan, cdiv, device_guard, device_info, launch, next_pow2, space,
                      splitk_finish)

_PRE_MIN_N = 64  # tokens from which the forward precomputes key and p instead of hashing per column block
_MAX_SPLIT = 64
_PARTIAL_BYTES = 32 << 20  # cap on the forward's fp32 split partials
_TUNE_MIN_TABLE = 1 << 22  # table elements from which the kernels are autotuned (smaller: the shape rules)


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _hash(x_ptr, rows, ks, mask, K, inv_t2, TAU: tl.constexpr, TAU_P2: tl.constexpr):
    """Chunks (rows[:, None], ks[None, :]) of x (rows int64): bucket h [BT, BK] (int32), weight p [BT, BK] (fp32, 0
    where masked) and the chunk values z [BT, BK, TAU_P2] (fp32, 0 past TAU or where masked)."""
    j = tl.arange(0, TAU_P2)
    off = (rows[:, None] * K + ks[None, :]) * TAU
    m3 = mask[:, :, None] & (j < TAU)[None, None, :]
    z = tl.load(x_ptr + off[:, :, None] + j[None, None, :], mask=m3, other=0.0).to(tl.float32)
    bit = tl.full([TAU_P2], 1, tl.int32) << j
    h = tl.sum(tl.where(z > 0, bit[None, None, :], 0), axis=2)
    p = tl.reduce(tl.where(m3, tl.sigmoid(tl.abs(z) * inv_t2), 1.0), 2, _mul)
    return h, tl.where(mask, p, 0.0), z


@triton.jit(do_not_specialize=["n"])
def _memory_hash_kernel(x_ptr, key_ptr, p_ptr, n, K, inv_t2, TAU: tl.constexpr, TAU_P2: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """key[t, k] = k * 2^TAU + h and p[t, k] for a [BLOCK_T, BLOCK_K] block of (token, table) pairs."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < n)[:, None] & (ks < K)[None, :]
    h, p, _ = _hash(x_ptr, rows, ks, mask, K, inv_t2, TAU, TAU_P2)
    pair = rows[:, None] * K + ks[None, :]
    key = (ks.to(tl.int64) << TAU)[None, :] + h
    tl.store(key_ptr + pair, key.to(key_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + pair, p, mask=mask)


@triton.jit(do_not_specialize=["n", "n_bucket"])
def _memory_forward_kernel(x_ptr, t_ptr, key_ptr, p_ptr, y_ptr, part_ptr, c_ptr, n, K, d_out, inv_t2, n_bucket,
                           TAU: tl.constexpr, TAU_P2: tl.constexpr, PRE: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT, STAGES: tl.constexpr):
    """y of a [BLOCK_T, BLOCK_N] tile: the sum over this split's tables, stored as y (SPLIT == 1) or as partial
    pid_s, the tile's last split to arrive summing the partials in split order (splitk_finish: one launch, the
    counter c_ptr[tile] back at 0 after it). ``n_bucket`` only keys the autotuner. SPLIT is a runtime int (Triton
    specializes the value 1), so the tuning candidates that differ only in SPLIT share a compile. STAGES > 1
    software-pipelines the table loop (the next steps' key/p and row gathers in flight through cp.async while this
    one accumulates); without tl.range(num_stages=) Triton does not pipeline a loop that has no tl.dot, whatever the
    launch's num_stages."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_s = tl.program_id(2)
    row_mask = rows < n
    col_mask = cols < d_out
    chunk = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # tables per split, whole steps
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    acc = tl.zeros((BLOCK_T, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < k_hi)[None, :]
        if PRE:
            pair = rows[:, None] * K + ks[None, :]
            key = tl.load(key_ptr + pair, mask=mask, other=0).to(tl.int64)
            p = tl.load(p_ptr + pair, mask=mask, other=0.0)
        else:
            h, p, _ = _hash(x_ptr, rows, ks, mask, K, inv_t2, TAU, TAU_P2)
            key = (ks.to(tl.int64) << TAU)[None, :] + h
        vals = tl.load(t_ptr + (key * d_out)[:, :, None] + cols[None, None, :],
                       mask=mask[:, :, None] & col_mask[None, None, :], other=0.0)
        acc += p[:, :, None] * vals.to(tl.float32)
    out = tl.sum(acc, axis=1)
    out_off = rows[:, None] * d_out + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + out_off, out.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptr + pid_s.to(tl.int64) * n * d_out + out_off, out, mask=out_mask)
    splitk_finish(y_ptr, part_ptr, c_ptr, rows, cols, n, d_out, SPLIT,
                  tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))


@triton.jit(do_not_specialize=["n", "n_bucket"])
def _memory_backward_kernel(g_ptr, x_ptr, t_ptr, gx_ptr, gt_ptr, key_ptr, p_ptr, n, K, d_out, inv_t2, n_bucket,
                            ATOMICS: tl.constexpr, STORE_KEYS: tl.constexpr, TAU: tl.constexpr,
                            TAU_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """Input gradient of a [BLOCK_T, BLOCK_K] block of (token, table) pairs; ATOMICS: gt[key] += p g (fp32);
    STORE_KEYS: key and p for the deterministic table gradient."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < n
    mask = row_mask[:, None] & (ks < K)[None, :]
    h, p, z = _hash(x_ptr, rows, ks, mask, K, inv_t2, TAU, TAU_P2)
    key = (ks.to(tl.int64) << TAU)[None, :] + h
    base = key * d_out
    acc = tl.zeros((BLOCK_T, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for c0 in tl.range(0, d_out, BLOCK_N, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < d_out
        g = tl.load(g_ptr + rows[:, None] * d_out + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        m3 = mask[:, :, None] & col_mask[None, None, :]
        vals = tl.load(t_ptr + base[:, :, None] + cols[None, None, :], mask=m3, other=0.0).to(tl.float32)
        acc += g[:, None, :] * vals
        if ATOMICS:
            tl.atomic_add(gt_ptr + base[:, :, None] + cols[None, None, :], p[:, :, None] * g[:, None, :], mask=m3,
                          sem="relaxed")
    dot = tl.sum(acc, axis=2)
    sgn = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
    gz = (dot * p * inv_t2)[:, :, None] * sgn * tl.sigmoid(-tl.abs(z) * inv_t2)
    j = tl.arange(0, TAU_P2)
    off = (rows[:, None] * K + ks[None, :]) * TAU
    tl.store(gx_ptr + off[:, :, None] + j[None, None, :], gz.to(gx_ptr.dtype.element_ty),
             mask=mask[:, :, None] & (j < TAU)[None, None, :])
    if STORE_KEYS:
        pair = rows[:, None] * K + ks[None, :]
        tl.store(key_ptr + pair, key.to(key_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + pair, p, mask=mask)


@triton.jit
def _segment_entry(order_ptr, p_ptr, g_ptr, e, hi, cols, col_mask, K, d_out):
    """Entry e of the rows' runs (live where e < hi): its weight p [ROWS] and g row [ROWS, BLOCK_N] (0 past hi)."""
    live = e < hi
    flat = tl.load(order_ptr + e, mask=live, other=0)  # index into the (n, K) pairs: token flat // K
    p = tl.load(p_ptr + flat, mask=live, other=0.0)
    # the token's g row in int64: order may be int32 (n K < 2^31) while the row starts past 2^31 (n d_out >= 2^31);
    # the division stays in order's width (a 64-bit division is a long instruction sequence on the GPU)
    g = tl.load(g_ptr + (flat // K).to(tl.int64)[:, None] * d_out + cols[None, :],
                mask=live[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    return live, p, g


@triton.jit(do_not_specialize=["n_bucket"])
def _segment_rows_kernel(start_ptr, order_ptr, p_ptr, g_ptr, gt_ptr, num_rows, K, d_out, n_bucket,
                         ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """gt[r, tile] = sum of p * g over row r's run [start[r], start[r + 1]) of the sorted (token, table) pairs, in
    sorted (= token) order, for ROWS rows; an empty run writes zeros. Four entries per step: their order indices,
    then their weights and g rows are all loaded before the first is added (a run is latency-bound otherwise: two
    dependent loads per entry), and added one after the other, each kept only where live (tl.where: an exact
    no-op past the run). The order per element is the same for every ROWS / BLOCK_N / num_warps / STAGES, so the
    bits do not depend on the config."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = r < num_rows
    col_mask = cols < d_out
    lo = tl.load(start_ptr + r, mask=row_mask, other=0).to(tl.int64)
    hi = tl.load(start_ptr + r + 1, mask=row_mask, other=0).to(tl.int64)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for j in tl.range(0, tl.max(hi - lo, axis=0), 4, num_stages=STAGES):
        e = lo + j
        l0, p0, g0 = _segment_entry(order_ptr, p_ptr, g_ptr, e, hi, cols, col_mask, K, d_out)
        l1, p1, g1 = _segment_entry(order_ptr, p_ptr, g_ptr, e + 1, hi, cols, col_mask, K, d_out)
        l2, p2, g2 = _segment_entry(order_ptr, p_ptr, g_ptr, e + 2, hi, cols, col_mask, K, d_out)
        l3, p3, g3 = _segment_entry(order_ptr, p_ptr, g_ptr, e + 3, hi, cols, col_mask, K, d_out)
        acc = tl.where(l0[:, None], acc + p0[:, None] * g0, acc)
        acc = tl.where(l1[:, None], acc + p1[:, None] * g1, acc)
        acc = tl.where(l2[:, None], acc + p2[:, None] * g2, acc)
        acc = tl.where(l3[:, None], acc + p3[:, None] * g3, acc)
    tl.store(gt_ptr + r[:, None] * d_out + cols[None, :], acc.to(gt_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _rank_keys_kernel(key_ptr, order_ptr, start_ptr, n, K, B: tl.constexpr, BLOCK_T: tl.constexpr):
    """Counting sort of table k's keys (program k; key[t, k] = k B + h, 0 <= h < B): the stable order and the run
    starts that torch.sort(stable=True) and torch.searchsorted give for the flat (n, K) keys, table k's pairs being
    entries [k n, (k + 1) n) of the sorted order. Pass 1 counts each bucket ([BLOCK_T, B] one-hot blocks), its
    exclusive scan gives the runs' starts; pass 2 places each token at its bucket's next free entry, the tokens of
    a block ranked by a cumulative sum over the one-hot block (earlier tokens first: stable). Integer arithmetic
    only: the same result for any BLOCK_T and warps."""
    k = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, B)
    key0 = k * B
    counts = tl.zeros((B,), dtype=tl.int32)
    for t0 in tl.range(0, n, BLOCK_T, num_stages=3):
        t = t0 + tl.arange(0, BLOCK_T)
        h = tl.load(key_ptr + t.to(tl.int64) * K + k, mask=t < n, other=-1) - key0  # masked: < 0, in no bin
        counts += tl.sum((h[:, None] == bins[None, :]).to(tl.int32), axis=0)
    run = tl.cumsum(counts, axis=0) - counts  # bucket b's first entry in the table's n
    tl.store(start_ptr + key0 + bins, (k * n + run).to(start_ptr.dtype.element_ty))
    total = k * 0 + n  # int64 (n may be a specialized constant)
    tl.store(start_ptr + (k * 0 + K) * B, (total * K).to(start_ptr.dtype.element_ty), mask=k == K - 1)  # the end
    for t0 in tl.range(0, n, BLOCK_T, num_stages=3):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < n
        h = tl.load(key_ptr + t.to(tl.int64) * K + k, mask=live, other=-1) - key0
        hit = (h[:, None] == bins[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit  # earlier tokens of the block in the same bucket
        pos = tl.sum(hit * (run[None, :] + before), axis=1)
        tl.store(order_ptr + k * n + pos, (t.to(tl.int64) * K + k).to(order_ptr.dtype.element_ty), mask=live)
        run += tl.sum(hit, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Config spaces, pruning and shape heuristics. Every choice below depends only on the autotuning key (n bucket, K,
# d_out, TAU, flags, dtypes) and the device's SM count, never on the exact n.


def _pow2(v):
    return next_pow2(max(int(v), 1))


def _n_bucket(n):
    return _pow2(n)


def _sm_count(device):
    return device_info(device)[0]


def _token_blocks(nb):
    """BLOCK_T candidates: one token or the whole batch when decoding, 16 or 64 rows for batches."""
    return {1, nb} if nb <= 16 else {b for b in (16, 64) if b <= nb}


def _block_n_ok(bn, d_out):
    """Column tiles of >= 128 values (256 B in bf16: 16 B per thread) unless d_out is smaller, none wider than
    d_out needs."""
    return min(128, max(64, _pow2(d_out))) <= bn <= max(64, _pow2(d_out))


def _config(num_warps=4, **kwargs):
    """A config whose loop pipelining depth STAGES (a kernel constexpr, see _memory_forward_kernel) is also its
    num_stages, so the autotuner's printout shows it once under the usual name."""
    return triton.Config(kwargs, num_warps=num_warps, num_stages=kwargs["STAGES"])


def _warps(tile):
    return max(2, min(8, tile // 512))  # ~16 fp32 values per thread and tensor


def _split_cap(nb, K, d_out, block_k):
    """Largest SPLIT: each split has >= 1 step of BLOCK_K tables, <= 64, partials within _PARTIAL_BYTES."""
    cap = 1
    while (cap * 2 <= _MAX_SPLIT and cap * 2 <= cdiv(K, block_k)
           and cap * 2 * nb * d_out * 4 <= _PARTIAL_BYTES):
        cap *= 2
    return cap


def _split_choices(base, cap, sms):
    """SPLIT values worth timing for ``base`` = token blocks x column blocks programs: 1 when base already gives
    two waves, else the smallest power of 2 reaching 2 programs per SM and its double (within ``cap``)."""
    if base >= 2 * sms:
        return {1}
    s = 1
    while s < cap and base * s < 2 * sms:
        s *= 2
    return {s, min(2 * s, cap)}


def _fwd_space():
    return [_config(num_warps=w, BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, SPLIT=s, STAGES=st)
            for bt in (1, 2, 4, 8, 16, 32, 64) for bk in (1, 2, 4, 8, 16) for bn in (64, 128, 256, 512)
            if 1024 <= bt * bk * bn <= 8192
            for s in (1, 2, 4, 8, 16, 32, 64) for w in (2, 4, 8) for st in (1, 2, 3, 4)]


def _fwd_default(nb, K, d_out, sms):
    """The config by a shape rule (deterministic-algorithms mode, and the fallback of the pruner)."""
    bt = 1 if nb < 16 else 16
    bn = min(256, max(16, _pow2(d_out)))
    bk = max(1, min(16, 2048 // (bt * bn), _pow2(K)))
    base = cdiv(nb, bt) * cdiv(d_out, bn)
    split = min(_split_choices(base, _split_cap(nb, K, d_out, bk), sms))
    steps = cdiv(cdiv(K, split), bk)
    return _config(num_warps=4, BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, SPLIT=split, STAGES=3 if steps >= 8 else 1)


def _fwd_prune_for(configs, nb, K, d_out, sms):
    bts = _token_blocks(nb)
    tiles = (2048, 4096) if nb <= 16 else (2048, 4096, 8192)
    keep = []
    for c in configs:
        bt, bk, bn, split = (c.kwargs[k] for k in ("BLOCK_T", "BLOCK_K", "BLOCK_N", "SPLIT"))
        tile = bt * bk * bn
        if bt not in bts or tile not in tiles or not _block_n_ok(bn, d_out) or bk > _pow2(K):
            continue
        if c.num_warps != _warps(tile):
            continue
        if nb <= 16 and bt * bk < min(8, _pow2(K)):
            continue  # decode: >= 8 independent row gathers per program step (a token is latency-bound)
        base = cdiv(nb, bt) * cdiv(d_out, bn)
        splits = _split_choices(base, _split_cap(nb, K, d_out, bk), sms)
        if split not in splits:
            continue
        steps = cdiv(cdiv(K, split), bk)  # loop trips per program
        if c.num_stages not in (1, 3) or (c.num_stages == 3 and (steps < 8 or split > min(splits))):
            continue  # pipelining or a split: two answers to the same latency; both only at the fewest splits
        keep.append(c)
    return keep or [_fwd_default(nb, K, d_out, sms)]


def _fwd_prune(configs, named_args, **kwargs):
    return _fwd_prune_for(configs, named_args["n_bucket"], named_args["K"], named_args["d_out"],
                          _sm_count(named_args["x_ptr"].device))


def _bwd_space():
    return [_config(num_warps=w, BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, STAGES=st)
            for bt in (1, 2, 4, 8, 16, 32, 64) for bk in (1, 2, 4, 8, 16) for bn in (64, 128, 256, 512)
            if 1024 <= bt * bk * bn <= 8192 for w in (2, 4, 8) for st in (1, 2, 3, 4)]


def _bwd_default(nb, K, d_out):
    """Fixed by shape: deterministic mode (its input gradient's summation order follows the tile shape and warps;
    pipelining does not change it) and fallback."""
    bt = 1 if nb < 16 else 16
    bn = min(128, max(16, _pow2(d_out)))
    bk = max(1, min(8, 2048 // (bt * bn), _pow2(K)))
    return _config(num_warps=4, BLOCK_T=bt, BLOCK_K=bk, BLOCK_N=bn, STAGES=3 if cdiv(d_out, bn) >= 8 else 1)


def _bwd_prune_for(configs, nb, K, d_out, sms):
    bts = _token_blocks(nb)
    tiles = (2048, 4096) if nb <= 16 else (2048, 4096, 8192)
    keep = []
    for c in configs:
        bt, bk, bn = (c.kwargs[k] for k in ("BLOCK_T", "BLOCK_K", "BLOCK_N"))
        tile = bt * bk * bn
        if bt not in bts or tile not in tiles or not _block_n_ok(bn, d_out) or bk > _pow2(K):
            continue
        if c.num_warps != _warps(tile):
            continue
        if bk > 1 and cdiv(nb, bt) * cdiv(K, bk) < sms:  # keep >= 1 program per SM
            continue
        if c.num_stages not in ((1, 3) if cdiv(d_out, bn) >= 8 else (1,)):
            continue
        keep.append(c)
    return keep or [_bwd_default(nb, K, d_out)]


def _bwd_prune(configs, named_args, **kwargs):
    return _bwd_prune_for(configs, named_args["n_bucket"], named_args["K"], named_args["d_out"],
                          _sm_count(named_args["x_ptr"].device))


def _seg_space():
    return [_config(num_warps=w, ROWS=r, BLOCK_N=bn, STAGES=st)
            for r in (1, 2, 4, 8, 16, 32) for bn in (64, 128, 256, 512) if 512 <= r * bn <= 4096
            for w in (1, 2, 4, 8) for st in (1, 2, 3)]


def _seg_default(d_out):
    return _config(num_warps=4, ROWS=4, BLOCK_N=min(256, max(16, _pow2(d_out))), STAGES=1)


def _seg_prune_for(configs, d_out):
    keep = []
    for c in configs:
        rows, bn = c.kwargs["ROWS"], c.kwargs["BLOCK_N"]
        if rows < 4 or not _block_n_ok(bn, d_out):
            continue
        if rows * bn not in (1024, 2048) or c.num_warps != max(1, min(8, rows * bn // 256)):
            continue
        if c.num_stages not in (1, 2):
            continue
        keep.append(c)
    return keep or [_seg_default(d_out)]


def _seg_prune(configs, named_args, **kwargs):
    return _seg_prune_for(configs, named_args["d_out"])


# Under the interpreter every config would be timed in numpy: one config each (the tests force others).
_FWD_CONFIGS = space(_fwd_space, _config(BLOCK_T=16, BLOCK_K=4, BLOCK_N=64, SPLIT=2, STAGES=2))
_BWD_CONFIGS = space(_bwd_space, _config(BLOCK_T=16, BLOCK_K=4, BLOCK_N=64, STAGES=2))
_SEG_CONFIGS = space(_seg_space, _config(ROWS=4, BLOCK_N=64, STAGES=2))


_FWD = Launcher(_memory_forward_kernel, _FWD_CONFIGS, ["n_bucket", "K", "d_out", "TAU", "PRE"], _fwd_prune)
_BWD = Launcher(_memory_backward_kernel, _BWD_CONFIGS, ["n_bucket", "K", "d_out", "TAU", "ATOMICS", "STORE_KEYS"],
                _bwd_prune, reset_to_zero=["gt_ptr"])
_SEG = Launcher(_segment_rows_kernel, _SEG_CONFIGS, ["n_bucket", "K", "d_out"], _seg_prune)
# The autotuners (module-level: bench/gpu_report.py prints the configs they chose).
memory_forward_autotuned, memory_backward_autotuned, memory_segment_autotuned = (
    _FWD.autotuner, _BWD.autotuner, _SEG.autotuner)


def _fwd_candidates(nb, K, d_out, sms):
    if len(_FWD_CONFIGS) == 1:
        return _FWD_CONFIGS
    return _fwd_prune_for(_FWD_CONFIGS, nb, K, d_out, sms)


@functools.lru_cache(maxsize=256)
def _fwd_tuning_scratch(nb, K, d_out, sms):
    """(the largest SPLIT, the most output tiles) over the tuning candidates at n bucket ``nb`` (n <= nb)."""
    cands = _fwd_candidates(nb, K, d_out, sms)
    return (max(c.kwargs["SPLIT"] for c in cands),
            max(cdiv(nb, c.kwargs["BLOCK_T"]) * cdiv(d_out, c.kwargs["BLOCK_N"]) for c in cands))


@functools.lru_cache(maxsize=None)
def _unused(device, dtype):
    """A 1-element stand-in for a pointer argument the launched variant never reads (cached: no allocation per
    call); the dtype matches the real tensor so the autotuning key stays the same."""
    return torch.empty(1, dtype=dtype, device=device)


def _key_dtype(K, tau):
    return torch.int32 if (K << tau) < 2**31 else torch.int64


def _hash_pairs(x, K, tau, t):
    n = x.shape[0]
    keys = torch.empty((n, K), dtype=_key_dtype(K, tau), device=x.device)
    ps = torch.empty((n, K), dtype=torch.float32, device=x.device)
    if n * K:
        bt, bk = 16, min(32, _pow2(K))
        launch(_memory_hash_kernel, (cdiv(n, bt), cdiv(K, bk)),
               x, keys, ps, n, K, 2.0 / t, TAU=tau, TAU_P2=_pow2(tau), BLOCK_T=bt, BLOCK_K=bk, num_warps=4)
    return keys, ps


def memory_hash_triton(x, K, tau, t):
    """(key, p): int32/int64 table row k 2^tau + h and fp32 weight of every (token, table) pair, shape (n, K)."""
    with device_guard(x.device):
        return _hash_pairs(x, K, tau, t)


def _tuned(tables):
    """Autotune only tables big enough for it to matter (under the interpreter: always, with its one config);
    smaller ones, and torch.use_deterministic_algorithms(True), take the shape rule."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return INTERPRET or tables.numel() >= _TUNE_MIN_TABLE


def _forced(launcher, config, grid, meta):
    """The plan of a config given by the caller (tests): not cached."""
    return Plan(launcher.kernel, grid(config.kwargs), {**meta, **config.all_kwargs()}, config)


def _launch_forward(x, tables, t, y, config=None, pre=None):
    """Run the forward into y with ``config`` (None: the cached plan, made on the first call of its key from the
    autotuner or the shape rule, see _tuned); returns the config."""
    n = x.shape[0]
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    pre = n >= _PRE_MIN_N if pre is None else pre
    if pre:
        keys, ps = _hash_pairs(x, K, tau, t)
    else:
        keys, ps = _unused(x.device, _key_dtype(K, tau)), _unused(x.device, torch.float32)
    nb = _n_bucket(n)
    tuned = config is None and _tuned(tables)
    key = (n, K, d_out, tau, pre, tuned, x.dtype, tables.dtype, x.device)
    plan = _FWD.plans.get(key) if config is None else None
    if plan is None:
        meta = dict(TAU=tau, TAU_P2=_pow2(tau), PRE=pre)
        grid = lambda c: (cdiv(n, c["BLOCK_T"]), cdiv(d_out, c["BLOCK_N"]), c["SPLIT"])  # noqa: E731
        if config is not None:
            plan = _forced(_FWD, config, grid, meta)
        else:
            sms = _sm_count(x.device)
            bucket = (nb,) + key[1:]
            if tuned and bucket not in _FWD.chosen:
                # the tuning launch: partials for the largest candidate split, counters for the most tiles (each
                # timed run reduces its splits in the launch, so the time a config is chosen by includes it)
                max_split, max_tiles = _fwd_tuning_scratch(nb, K, d_out, sms)
                scratch = SCRATCH.get(y, max_split, n * d_out, max_tiles)
                cfg, launched = _FWD.choose(bucket, grid, (x, tables, keys, ps, y, *scratch, n, K, d_out, 2.0 / t,
                                                           nb), meta)
                plan = _FWD.plan(key, cfg, grid(cfg.kwargs), meta)
                if launched:
                    return cfg  # (else a provisional config, inside a CUDA-graph capture: launched below)
            else:
                cfg, _ = _FWD.choose(bucket, grid, None, meta, None if tuned else _fwd_default(nb, K, d_out, sms))
                plan = _FWD.plan(key, cfg, grid(cfg.kwargs), meta)
    scratch = SCRATCH.get(y, plan.config.kwargs["SPLIT"], n * d_out, plan.grid[0] * plan.grid[1])
    plan.launch(x, tables, keys, ps, y, *scratch, n, K, d_out, 2.0 / t, nb)
    return plan.config


def memory_lookup_forward_triton(x, tables, t):
    n = x.shape[0]
    K, _, d_out = tables.shape
    with device_guard(x.device):
        if n == 0 or d_out == 0 or K == 0:
            return torch.zeros((n, d_out), dtype=x.dtype, device=x.device)
        y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
        _launch_forward(x, tables, t, y)
    return y


def _launch_backward(grad, x, tables, t, gx, gt, keys, ps, atomics, store_keys, config=None, deterministic=None):
    """Input gradient into gx (and gt += p g with ATOMICS, key/p with STORE_KEYS); config None: the cached plan (the
    autotuner, or the shape rule: in deterministic mode, by default whenever keys are stored, and see _tuned);
    returns the config."""
    n = x.shape[0]
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    nb = _n_bucket(n)
    args = (grad, x, tables, gx, gt, keys, ps, n, K, d_out, 2.0 / t, nb)
    meta = dict(ATOMICS=atomics, STORE_KEYS=store_keys, TAU=tau, TAU_P2=_pow2(tau))
    grid = lambda c: (cdiv(n, c["BLOCK_T"]), cdiv(K, c["BLOCK_K"]))  # noqa: E731
    if config is not None:
        plan = _forced(_BWD, config, grid, meta)
        plan.launch(*args)
        return config
    deterministic = store_keys if deterministic is None else deterministic
    tuned = not deterministic and _tuned(tables)  # deterministic mode: the shape rule's config
    key = (n, K, d_out, tau, atomics, store_keys, tuned, x.dtype, tables.dtype, grad.dtype, x.device)
    return _BWD.launch(key, args, lambda: ((nb,) + key[1:], grid, meta,
                                           None if tuned else _bwd_default(nb, K, d_out))).config


RANK_MAX_BUCKETS = 1024  # the counting sort's limit (one-hot blocks of BLOCK_T x 2^tau); above it torch.sort
_RANK_BLOCK = 8192  # values of a one-hot block


def sort_pairs(keys, buckets):
    """(starts, order) of the (n, K) row keys k * buckets + h (0 <= h < buckets): ``order`` lists the flat pair
    indices t K + k stably sorted by key, ``starts`` (K buckets + 1) each row's first entry in it, the last = n K;
    int32 where n K < 2^31, else int64. A counting sort per table (``_rank_keys_kernel``, one launch) for up to
    RANK_MAX_BUCKETS buckets, else torch.sort + torch.searchsorted: the same result either way."""
    n, K = keys.shape
    index = torch.int32 if n * K < 2**31 else torch.int64
    if buckets > RANK_MAX_BUCKETS:
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        bounds = torch.arange(K * buckets + 1, dtype=keys.dtype, device=keys.device)
        return torch.searchsorted(sorted_keys, bounds, out_int32=index == torch.int32), order
    starts = torch.empty(K * buckets + 1, dtype=index, device=keys.device)
    order = torch.empty(n * K, dtype=index, device=keys.device)
    if K:
        bt = max(1, min(64, _RANK_BLOCK // buckets))
        launch(_rank_keys_kernel, (K,), keys, order, starts, n, K, B=buckets, BLOCK_T=bt, num_warps=4)
    else:
        starts.zero_()
    return starts, order


def _launch_segments(keys, ps, grad, gt, config=None):
    """gt (K, 2^tau, d_out), every row written: fixed-order run sums over the stably sorted keys. The bits do not
    depend on the config, so this one is autotuned in deterministic mode too."""
    n, K = keys.shape
    rows = gt.shape[0] * gt.shape[1]
    d_out = gt.shape[2]
    starts, order = sort_pairs(keys, gt.shape[1])
    nb = _n_bucket(n)
    args = (starts, order, ps, grad, gt, rows, K, d_out, nb)
    grid = lambda c: (cdiv(rows, c["ROWS"]), cdiv(d_out, c["BLOCK_N"]))  # noqa: E731
    if config is not None:
        plan = _forced(_SEG, config, grid, {})
        plan.launch(*args)
        return config
    tuned = INTERPRET or gt.numel() >= _TUNE_MIN_TABLE
    key = (n, K, rows, d_out, tuned, starts.dtype, grad.dtype, gt.dtype, gt.device)
    return _SEG.launch(key, args, lambda: ((nb,) + key[1:], grid, {}, None if tuned else _seg_default(d_out))).config


def memory_lookup_backward_triton(grad, x, tables, t, deterministic, segments=True):
    """(grad_x, grad_tables). The table gradient: the sorted segment reduction when ``deterministic`` or
    ``segments`` (the op passes weightkit.ops.memoryformer.table_grad_mode() == "segments"), else fp32 atomics."""
    n = x.shape[0]
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    with device_guard(x.device):
        gx = torch.empty((n, K * tau), dtype=x.dtype, device=x.device)
        if n * K == 0:
            return gx, torch.zeros_like(tables)
        if deterministic or segments:
            gt = torch.empty_like(tables)  # every row written once by the segment kernel
            keys = torch.empty((n, K), dtype=_key_dtype(K, tau), device=x.device)
            ps = torch.empty((n, K), dtype=torch.float32, device=x.device)
            # deterministic: the shape rule's config (see _tuned), the input gradient's dot over d_out being summed
            # in the config's order; else the tuned one
            _launch_backward(grad, x, tables, t, gx, _unused(x.device, torch.float32), keys, ps, False, True,
                             deterministic=deterministic)  # no gt: nothing for the tuner's reset_to_zero to clear
            if d_out:
                _launch_segments(keys, ps, grad, gt)
            return gx, gt
        gt = torch.zeros(tables.shape, dtype=torch.float32, device=x.device)  # zeroed inside the op (graph-safe)
        keys, ps = _unused(x.device, _key_dtype(K, tau)), _unused(x.device, torch.float32)
        _launch_backward(grad, x, tables, t, gx, gt, keys, ps, True, False)
        return gx, gt.to(tables.dtype)
