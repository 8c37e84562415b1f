"""CPU emulations of the index arithmetic of CUDA kernels: each port follows its kernel line by line (blocks, passes,
warps' 32-task batches, lanes as numpy vectors) and counts every write, so the tests check what a GPU run would: each
output element written exactly once (no race, no gap), every shared-memory read of an entry written in the same
pass, every read in bounds, and the result equal to the reference. A port checks the port; the kernels' own code
runs on the CPU in tests/test_cudasim.py (cudasim, under ASan and UBSan); the write counts and the small kRows here
are what these ports add.

* csrc/cuda/dictionary.cu, bitmask_dense_t_kernel: the multi-pass decode (values staged kRows at a time) and the
  gather for grad_values, with small kRows so a few columns take many passes;
* csrc/cuda/memoryformer.cu, memory_forward_kernel: the (token block, column tile, table split) grid of the host's
  forward_plan, the per-tile arrival counters and the split-ordered sum of the partials;
* csrc/cuda/memoryformer.cu, rank_keys_kernel: the counting sort of the segment pass (a warp per table, the lanes of
  one bucket ranked by __match_any_sync), against torch.sort(stable=True) + torch.searchsorted.
"""

import numpy as np
import pytest
import torch

from weightkit.ops.dictionary import bitmask_to_dense, pack_bitmask

K_TILE_COLS, K_WARPS = 16, 8  # dictionary.cu: kTileCols, kWarps


def _stage_rows(value_bytes, stage_bytes=32 * 1024):
    """dictionary.cu's Stage<V>: (kStride, kRows) of the shared-memory staging for values of value_bytes bytes."""
    stride = K_TILE_COLS + 4 // value_bytes
    return stride, stage_bytes // (stride * value_bytes)


def test_dictionary_stage_fits_static_shared_memory():
    """The stage is a static __shared__ array: <= 48 KB without the opt-in attribute, rows an odd number of 32-bit
    words (the lanes of a warp, consecutive ranks of one column, hit distinct banks)."""
    for value_bytes in (4, 2):
        stride, rows = _stage_rows(value_bytes)
        assert rows * stride * value_bytes <= 48 * 1024
        assert (stride * value_bytes) % 4 == 0 and (stride * value_bytes // 4) % 2 == 1


def emulate_bitmask_dense_t(gather, vals, dense_t, bitmask, offsets, k, s, d_out, k_rows):
    """bitmask_dense_t_kernel<GATHER> on numpy arrays (vals: s x d_out, dense_t: d_out x k, bitmask and offsets:
    words x d_out), kRows = k_rows. Returns the write count of every element of the output (dense_t, or vals)."""
    words = (k + 31) // 32
    lanes = np.arange(32)
    below = (1 << lanes) - 1
    writes = np.zeros(vals.shape if gather else dense_t.shape, dtype=np.int64)
    bitmask = bitmask.astype(np.int64) & 0xFFFFFFFF
    for block in range((d_out + K_TILE_COLS - 1) // K_TILE_COLS):
        n0 = block * K_TILE_COLS
        cols = min(d_out - n0, K_TILE_COLS)
        passes = (s + k_rows - 1) // k_rows if s > 0 else 1
        for p in range(passes):
            r0 = p * k_rows
            rows = min(s - r0, k_rows)
            stage = np.full((k_rows, K_TILE_COLS), np.nan)  # NaN: never written in this pass
            if not gather:
                for r in range(rows):
                    stage[r, :cols] = vals[r0 + r, n0:n0 + cols]
            tasks = cols * words
            for warp in range(K_WARPS):
                for t0 in range(32 * warp, tasks, 32 * K_WARPS):
                    todo = min(tasks - t0, 32)
                    for j in range(todo):
                        task = t0 + j
                        c, w = task // words, task % words
                        at = w * d_out + n0 + c
                        word, base = int(bitmask.reshape(-1)[at]), int(offsets.reshape(-1)[at])
                        count = bin(word).count("1")
                        if not (p == 0 and not gather) and (count == 0 or base + count <= r0 or base >= r0 + rows):
                            continue
                        atom = 32 * w + lanes
                        live = atom < k
                        bit = ((word >> lanes) & 1).astype(bool)
                        rank = base + np.array([bin(word & int(b)).count("1") for b in below])
                        staged = live & bit & (rank >= r0) & (rank < r0 + rows)
                        n = n0 + c
                        if gather:
                            for lane in np.nonzero(staged)[0]:
                                stage[rank[lane] - r0, c] = dense_t[n, atom[lane]]
                        else:
                            for lane in np.nonzero(staged)[0]:
                                v = stage[rank[lane] - r0, c]
                                assert not np.isnan(v), "a staged value read before it was written"
                                dense_t[n, atom[lane]] = v
                                writes[n, atom[lane]] += 1
                            if p == 0:
                                zero = live & ~bit
                                dense_t[n, atom[zero]] = 0.0
                                writes[n, atom[zero]] += 1
            if gather:
                for r in range(rows):
                    for c in range(cols):
                        assert not np.isnan(stage[r, c]), "grad_values stores a stage entry no warp wrote"
                        vals[r0 + r, n0 + c] = stage[r, c]
                        writes[r0 + r, n0 + c] += 1
    return writes


@pytest.mark.parametrize("k,s,d_out,k_rows", [(70, 9, 37, 4), (100, 50, 17, 7), (33, 33, 5, 11), (64, 1, 16, 481),
                                              (300, 260, 20, 64)])
def test_dictionary_cuda_decode_and_gather_emulated(k, s, d_out, k_rows):
    """dense_t = S^T and grad_values = dense_t at the set bits, with columns taking several passes (s > kRows),
    k not a multiple of 32 and d_out not a multiple of the 16-column tile: each element written once."""
    gen = torch.Generator().manual_seed(k * 1000 + s)
    idx = torch.rand(k, d_out, generator=gen).argsort(0)[:s]
    values = torch.randn(s, d_out, generator=gen, dtype=torch.float64)
    bitmask, values, offsets = pack_bitmask(idx, values, k)
    expected = bitmask_to_dense(bitmask, values, k).T.numpy()  # d_out x k
    dense_t = np.full((d_out, k), np.nan)
    writes = emulate_bitmask_dense_t(False, values.numpy().copy(), dense_t, bitmask.numpy(),
                                     offsets.to(torch.int64).numpy(), k, s, d_out, k_rows)
    assert (writes == 1).all()
    np.testing.assert_array_equal(dense_t, expected)

    grad_s_t = np.random.default_rng(k).standard_normal((d_out, k))
    out = np.full((s, d_out), np.nan)
    writes = emulate_bitmask_dense_t(True, out, grad_s_t, bitmask.numpy(), offsets.to(torch.int64).numpy(), k, s,
                                     d_out, k_rows)
    assert (writes == 1).all()
    bits = expected != 0  # values are continuous random: no stored zero
    for j in range(d_out):  # column j's set bits in atom order are values' rows 0 .. s - 1
        np.testing.assert_array_equal(out[:, j], grad_s_t[j][bits[j]])


def emulate_memory_forward(x, tables, t, token_block, splits):
    """memory_forward_kernel's grid on numpy (fp64): y, the counter index of every block, and the partial entries
    written per (split, token, column)."""
    n, k_tau = x.shape
    K, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    vec = 16 // tables.element_size()
    tile = 32 * vec
    grid = ((n + token_block - 1) // token_block, (d_out + tile - 1) // tile, splits)
    chunk = (K + splits - 1) // splits
    xs = x.double().numpy().reshape(n, K, tau)
    tab = tables.double().numpy()
    inv_t2 = 2.0 / t
    partials = np.full((splits, n, d_out), np.nan)
    part_writes = np.zeros((splits, n, d_out), dtype=np.int64)
    arrivals = {}
    y = np.full((n, d_out), np.nan)
    order = []
    for bx in range(grid[0]):
        for by in range(grid[1]):
            for bz in range(grid[2]):
                order.append((bx, by, bz))
    for bx, by, bz in order:
        t0, c0 = bx * token_block, by * tile
        k_lo, k_hi = bz * chunk, min(K, bz * chunk + chunk)
        for b in range(token_block):
            tok = t0 + b
            if tok >= n:
                continue
            acc = np.zeros(tile)
            for kk in range(k_lo, k_hi):
                z = xs[tok, kk]
                h = int(sum(1 << e for e in range(tau) if z[e] > 0))
                p = np.prod(1.0 / (1.0 + np.exp(-np.abs(z) * inv_t2)))
                cols = np.arange(c0, min(c0 + tile, d_out))
                acc[:len(cols)] += p * tab[kk, h, cols]
            cols = np.arange(c0, min(c0 + tile, d_out))
            if splits == 1:
                y[tok, cols] = acc[:len(cols)]
            else:
                partials[bz, tok, cols] = acc[:len(cols)]
                part_writes[bz, tok, cols] += 1
        if splits > 1:
            counter = bx * grid[1] + by
            arrivals[counter] = arrivals.get(counter, 0) + 1
            if arrivals[counter] == splits:  # the last block of the tile sums the splits in order
                for b in range(token_block):
                    tok = t0 + b
                    if tok < n:
                        cols = np.arange(c0, min(c0 + tile, d_out))
                        y[tok, cols] = sum(partials[sp, tok, cols] for sp in range(splits))
    return y, arrivals, part_writes


@pytest.mark.parametrize("n,K,tau,d_out,dtype", [(1, 64, 3, 300, torch.bfloat16), (2, 40, 2, 130, torch.float32),
                                                 (5, 24, 4, 257, torch.float16), (3, 16, 1, 7, torch.float32)])
def test_memoryformer_cuda_forward_grid_emulated(n, K, tau, d_out, dtype):
    """The host's forward_plan (token block, splits, counters) and the kernel's grid agree: every counter index is
    < the counters the host allocates and is hit `splits` times (the last arrival then sums the partials), each
    partial entry is written once, and y matches the op's reference."""
    from weightkit.backends.cuda.memoryformer import forward_plan
    from weightkit.ops.memoryformer import memory_lookup_reference

    gen = torch.Generator().manual_seed(n * 100 + K)
    x = torch.randn(n, K * tau, generator=gen)
    tables = torch.randn(K, 2 ** tau, d_out, generator=gen).to(dtype)
    for sms in (132, 1):  # a full GPU (splits) and one SM (no split)
        tb, splits, tiles = forward_plan(n, K, d_out, tables.element_size(), sms)
        y, arrivals, part_writes = emulate_memory_forward(x, tables, 1.5, tb, splits)
        if splits > 1:
            assert sorted(arrivals) == list(range(tiles)) and set(arrivals.values()) == {splits}
            assert (part_writes == 1).all()
        ref = memory_lookup_reference(x.double(), tables.double(), 1.5).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)


def emulate_rank_keys(keys, buckets):
    """rank_keys_kernel on numpy (keys: n x K int64, every warp a table, lanes as vectors): (order, starts) and the
    write count of every entry of each."""
    n, K = keys.shape
    lanes = np.arange(32)
    order = np.full(n * K, -1, dtype=np.int64)
    starts = np.full(K * buckets + 1, -1, dtype=np.int64)
    order_writes = np.zeros(n * K, dtype=np.int64)
    start_writes = np.zeros(K * buckets + 1, dtype=np.int64)
    for k in range(K):  # one warp each; warps share nothing
        run = np.zeros(buckets, dtype=np.int64)  # the warp's row of next_free (zeroed by its lanes)
        key0 = k * buckets
        for t0 in range(0, n, 32 * 4):  # kRankAhead = 4 loads per lane, then their atomicAdds: order free
            for a in range(4):
                t = t0 + 32 * a + lanes
                for h in keys[t[t < n], k] - key0:
                    assert 0 <= h < buckets
                    run[h] += 1
        carry = 0
        for b0 in range(0, buckets, 32):  # the exclusive scan, 32 buckets a step (shfl_up ladder)
            b = b0 + lanes
            count = np.where(b < buckets, run[np.minimum(b, buckets - 1)], 0)
            inclusive = count.copy()
            d = 1
            while d < 32:
                shifted = np.concatenate([inclusive[:d], inclusive[:-d]])  # __shfl_up_sync: lanes < d keep theirs
                inclusive = np.where(lanes >= d, inclusive + shifted, inclusive)
                d <<= 1
            live = b < buckets
            run[b[live]] = carry + inclusive[live] - count[live]
            starts[key0 + b[live]] = k * n + carry + inclusive[live] - count[live]
            start_writes[key0 + b[live]] += 1
            carry += inclusive[31]
        if k == K - 1:
            starts[K * buckets] = n * K
            start_writes[K * buckets] += 1
        below = (1 << lanes) - 1
        for t0 in range(0, n, 32):
            t = t0 + lanes
            h = np.where(t < n, keys[np.minimum(t, n - 1), k] - key0, -1)
            peers = np.array([sum(1 << j for j in range(32) if h[j] == h[i]) for i in range(32)])  # __match_any_sync
            base = np.where(h >= 0, run[np.maximum(h, 0)], 0)  # every lane reads before any writes (__syncwarp)
            popc = np.vectorize(lambda v: bin(int(v)).count("1"))
            for i in np.nonzero(h >= 0)[0]:
                pos = k * n + base[i] + popc(peers[i] & below[i])
                order[pos] = t[i] * K + k
                order_writes[pos] += 1
                if int(peers[i]).bit_length() - 1 == i:  # 31 - __clz(peers): the highest lane of the bucket
                    run[h[i]] = base[i] + popc(peers[i])
    return order, starts, order_writes, start_writes


@pytest.mark.parametrize("n,K,tau,hot", [(1, 1, 1, False), (33, 3, 2, False), (70, 5, 6, True), (100, 2, 8, False),
                                         (64, 4, 10, True), (0, 3, 2, False)])
def test_memoryformer_cuda_rank_keys_emulated(n, K, tau, hot):
    """The counting sort writes every order entry and every run start exactly once, and gives what a stable sort of
    the flat keys and a search of each key's first entry give (hot: most tokens in 2 buckets, many lanes of a warp
    in one bucket)."""
    gen = torch.Generator().manual_seed(n * 1000 + K * 10 + tau)
    buckets = 1 << tau
    h = torch.randint(0, 2 if hot else buckets, (n, K), generator=gen)
    keys = torch.arange(K) * buckets + h
    order, starts, order_writes, start_writes = emulate_rank_keys(keys.numpy(), buckets)
    assert (order_writes == 1).all() and (start_writes == 1).all()
    sorted_keys, expect = torch.sort(keys.reshape(-1), stable=True)
    np.testing.assert_array_equal(order, expect.numpy())
    np.testing.assert_array_equal(starts, torch.searchsorted(sorted_keys, torch.arange(K * buckets + 1)).numpy())
