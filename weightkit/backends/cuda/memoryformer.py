"""cuda backend of weightkit/ops/memoryformer.py."""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from ... import native
from .._blocked import memory_rows
from . import check, sm_count, stream

_MAX_SPLIT = 64
_PARTIAL_BYTES = 32 << 20  # cap on the forward's fp32 split partials
_MIN_TABLES_PER_SPLIT = 8  # one per warp of a block


@functools.lru_cache(maxsize=1024)
def forward_plan(n: int, k: int, d_out: int, element_size: int, sms: int) -> Tuple[int, int, int]:
    """(token_block, splits, tiles) of the CUDA forward (csrc/cuda/memoryformer.cu): 1, 2 or 4 tokens per block,
    column tiles of 32 lanes x 16 B, and the fewest table splits (a power of 2) giving >= 2 blocks per SM, each
    split >= 8 tables (one per warp), <= 64 splits, fp32 partials within _PARTIAL_BYTES. ``tiles`` counts the
    (token block, column tile) pairs: the counters of the split combination."""
    tb = 1 if n == 1 else 2 if n == 2 else 4
    tile = 32 * (16 // element_size)
    tiles = -(-n // tb) * -(-d_out // tile)
    splits = 1
    while (tiles * splits < 2 * sms and 2 * splits <= _MAX_SPLIT and -(-k // (2 * splits)) >= _MIN_TABLES_PER_SPLIT
           and 2 * splits * n * d_out * 4 <= _PARTIAL_BYTES):
        splits *= 2
    return tb, splits, tiles


def memory_lookup_forward(x: Tensor, tables: Tensor, t: float) -> Tensor:
    x2, _, tables, (n, k, buckets, d_out, tau) = memory_rows(x, tables)
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    device, st = stream(x2)
    tb, splits, tiles = forward_plan(n, k, d_out, tables.element_size(), sm_count(device))
    if splits > 1:  # scratch from torch's allocator (graph-safe); the counters are zeroed in the op, on its stream
        partials = torch.empty((splits, n, d_out), dtype=torch.float32, device=x.device)
        counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
        ptrs = partials.data_ptr(), counters.data_ptr()
    else:
        ptrs = 0, 0
    check(native.CUDA.memory_lookup_forward(x2.data_ptr(), native.FLOAT_CODES[x.dtype], tables.data_ptr(),
                                            native.FLOAT_CODES[tables.dtype], y.data_ptr(), *ptrs, n, k, buckets,
                                            d_out, tau, t, tb, splits, device, st), "memory_lookup_forward")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], d_out)


RANK_MAX_BUCKETS = 1024  # the counting sort's limit (shared memory per warp); above it torch.sort


def _sort_pairs(keys: Tensor, buckets: int, device: int, st: int) -> Tuple[Tensor, Tensor]:
    """(starts, order), int64, as weightkit.kernels.memoryformer.sort_pairs: each key's first entry in ``order``
    (K buckets + 1 entries, the last n K), and the (n, K) keys' flat indices stably sorted by key. A counting sort
    per table (wk_cuda_memory_rank_keys, one launch) up to RANK_MAX_BUCKETS buckets, else torch.sort +
    torch.searchsorted: the same result."""
    n, k = keys.shape
    if buckets > RANK_MAX_BUCKETS:
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        return torch.searchsorted(sorted_keys, torch.arange(k * buckets + 1, dtype=torch.int64,
                                                            device=keys.device)), order
    order = torch.empty(n * k, dtype=torch.int64, device=keys.device)
    starts = (torch.zeros if k == 0 else torch.empty)(k * buckets + 1, dtype=torch.int64, device=keys.device)
    check(native.CUDA.memory_rank_keys(keys.data_ptr(), order.data_ptr(), starts.data_ptr(), n, k, buckets, device,
                                       st), "memory_lookup_backward")
    return starts, order


def memory_lookup_backward(grad: Tensor, x: Tensor, tables: Tensor, t: float, deterministic: bool,
                           segments: bool = True) -> Tuple[Tensor, Tensor]:
    """(grad_x in x's dtype, grad_tables in tables' dtype), in the dtypes given (no fp32 copies). The table gradient
    is a sorted segment reduction (a counting sort of the (table, bucket) keys per table, see _sort_pairs, then one
    write per row) when ``deterministic`` or ``segments`` (the op passes
    weightkit.ops.memoryformer.table_grad_mode() == "segments"), else fp32 atomics into a zeroed buffer, cast at the
    end."""
    x2, g2, tables, (n, k, buckets, d_out, tau) = memory_rows(x, tables, grad)
    if g2.dtype != x.dtype:
        g2 = g2.to(x.dtype)
    gx = torch.empty((n, k * tau), dtype=x.dtype, device=x.device)
    device, st = stream(x2)
    segments = deterministic or segments
    rows = k * buckets
    if segments:
        gt = torch.empty_like(tables)  # every row written once by the segment kernel
        keys = torch.empty((n, k), dtype=torch.int64, device=x.device)
        ps = torch.empty((n, k), dtype=torch.float32, device=x.device)
        gt_atomic, key_ptrs = 0, (keys.data_ptr(), ps.data_ptr())
    else:
        gt = torch.zeros(tables.shape, dtype=torch.float32, device=x.device)  # zeroed inside the op (graph-safe)
        gt_atomic, key_ptrs = gt.data_ptr(), (0, 0)
    check(native.CUDA.memory_lookup_backward(g2.data_ptr(), x2.data_ptr(), native.FLOAT_CODES[x.dtype],
                                             tables.data_ptr(), native.FLOAT_CODES[tables.dtype], gx.data_ptr(),
                                             gt_atomic, *key_ptrs, n, k, buckets, d_out, tau, t, device, st),
          "memory_lookup_backward")
    if segments:
        starts, order = _sort_pairs(keys, buckets, device, st)
        check(native.CUDA.memory_segment_sum(order.data_ptr(), starts.data_ptr(), ps.data_ptr(), g2.data_ptr(),
                                             native.FLOAT_CODES[x.dtype], gt.data_ptr(),
                                             native.FLOAT_CODES[tables.dtype], rows, k, d_out, device, st),
              "memory_lookup_backward")
    else:
        gt = gt.to(tables.dtype)
    return (gx if x.dim() == 2 else gx.reshape(x.shape)), gt
