"""Sparse-dense dictionary matmul (CoSpaDi, arXiv 2509.22075).

A weight with nn.Linear's convention y = x W^T is stored as W^T (d_in x d_out) = D S: D dense (d_in x k) and S
(k x d_out) with exactly s nonzeros per column. With Z = x D (a dense matmul, tokens x k), ``dict_bitmask_matmul``
applies S, kept in CoSpaDi's bitmask format (a bit per atom and column, the nonzeros in atom order, per-word
offsets); see the section comment before it. Backends: reference, cpu (C kernels reading the bitmask directly up to a
few tokens, S^T decoded to dense around torch's BLAS beyond), triton (S decoded tile by tile in registers: a split-K
GEMV for decode, tensor-core tiles beyond) and cuda (S^T decoded to a dense matrix in the activation's dtype by a CUDA
kernel, then cuBLAS).

S given as ELL (``values`` + ``indices``, s x d_out; what older DictLinear checkpoints hold) is converted with
:func:`pack_bitmask` (weightkit.nn.dictionary does so on load).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import KernelTable, tf32_allowed, token_bucket
from ..backends.cpu import dictionary as cpu_dictionary
from ..backends.cuda import dictionary as cuda_dictionary
from ..backends.triton import dictionary as triton_dictionary
from ._checks import FLOAT_DTYPES, check_tensor, require_finite
from ._registry import define

__all__ = ["index_dtype_for", "dict_bitmask_matmul", "bitmask_words", "offset_dtype_for",
           "bitmask_code_bytes", "pack_bitmask", "unpack_bitmask", "word_offsets_for", "bitmask_to_dense",
           "bitmask_to_indices", "check_bitmask_data"]

INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def index_dtype_for(k: int) -> torch.dtype:
    """The narrowest index dtype that holds atom indices 0..k-1."""
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    return torch.int32


# ---------------------------------------------------------------------------------------------------------
# S in CoSpaDi's bitmask format: y = Z S (``dict_bitmask_matmul``).
#
# ELL (values + one index per nonzero) at CoSpaDi's k/s = 2 takes, in bf16 with int16 indices, exactly the bytes of a
# dense S. The bitmask format stores, per column j of S (k x d_out):
#
#   bitmask      int32 (W, d_out), W = ceil(k / 32): bit t of word w of column j is set when atom 32 w + t is used
#                by column j (bits of atoms >= k are zero);
#   values       (s, d_out): column j's s nonzeros in ascending atom order (the r-th set bit's value is values[r, j]);
#   word_offsets (W, d_out), uint8 when s <= 255, int16 up to 32767, else int32: the set bits of column j in words
#                0..w-1 (an exclusive prefix popcount), so a kernel starting a tile at word w knows where its values
#                begin without scanning the words before it. Derived from the bitmask (word_offsets_for).
#
# Bytes per column: s b + 4 W + W ob (b per value, ob per offset): at k = 2 s in bf16 about 2.4 s bytes, against
# 4 s for ELL with int16 indices or for a dense bf16 S.
#
#   y[m, j] = sum over the set atoms a of column j of z[m, a] * S[a, j]          (S = bitmask_to_dense(...))
#
# Backward (bitmask frozen): grad_z = grad_y S^T; grad_values[r, j] = <z[:, a_r], grad_y[:, j]> for the r-th set
# atom a_r of column j. Accumulation is fp32 (float64 for float64 inputs); y and grad_z have z's dtype, grad_values
# values' dtype.

BITMASK_WORD_BITS = 32


def bitmask_words(k: int) -> int:
    """W = ceil(k / 32): int32 words per column of a k-atom bitmask."""
    return (k + BITMASK_WORD_BITS - 1) // BITMASK_WORD_BITS


def offset_dtype_for(s: int) -> torch.dtype:
    """The narrowest dtype of ``word_offsets`` (exclusive prefix popcounts, at most s) for s nonzeros per column."""
    if s <= 255:
        return torch.uint8
    if s <= 32767:
        return torch.int16
    return torch.int32


def bitmask_code_bytes(k: int, s: int, d_out: int, value_bytes: int) -> int:
    """Exact bytes of S (k x d_out, s nonzeros per column) in the bitmask format: values, bitmask and word_offsets."""
    words = bitmask_words(k)
    offset_bytes = torch.empty(0, dtype=offset_dtype_for(s)).element_size()
    return d_out * (s * value_bytes + words * 4 + words * offset_bytes)


def unpack_bitmask(bitmask: Tensor, k: int) -> Tensor:
    """The (k, d_out) bool matrix of used atoms: entry [a, j] is bit a % 32 of word a // 32 of column j."""
    shifts = torch.arange(BITMASK_WORD_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & 1  # arithmetic shift; & 1 keeps the bit
    return bits.reshape(-1, bitmask.shape[1])[:k].bool()


def word_popcounts(bitmask: Tensor) -> Tensor:
    """Set bits of each word, (W, d_out) int32."""
    return unpack_bitmask(bitmask, bitmask.shape[0] * BITMASK_WORD_BITS).reshape(
        bitmask.shape[0], BITMASK_WORD_BITS, -1).sum(1, dtype=torch.int32)


def word_offsets_for(bitmask: Tensor, s: int) -> Tensor:
    """``word_offsets`` of a bitmask with s set bits per column: the set bits of each column before each word."""
    counts = word_popcounts(bitmask)
    return (counts.cumsum(0, dtype=torch.int32) - counts).to(offset_dtype_for(s))


def pack_bitmask(indices: Tensor, values: Tensor, k: int):
    """(bitmask, values sorted by atom, word_offsets) of S given as ELL: column j uses atoms indices[:, j] (s distinct
    atoms in [0, k), any order) with coefficients values[:, j]. Reads the indices (a host sync on a GPU): for building
    layers, not for hot paths."""
    check_tensor("indices", indices, dtypes=INDEX_DTYPES, ndim=2)
    check_tensor("values", values, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2, device=indices.device)
    if indices.shape != values.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have the same shape")
    s, d_out = indices.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < s:
        raise ValueError(f"k must be an int >= s={s} (the atoms of the dictionary), got {k!r}")
    idx = indices.long()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"indices must lie in [0, k={k}), got values in [{lo}, {hi}]")
    order = idx.argsort(dim=0, stable=True)
    idx = idx.gather(0, order)
    if s > 1 and bool((idx[1:] == idx[:-1]).any()):
        raise ValueError("indices must hold s distinct atoms per column (a column repeats an atom)")
    words = torch.zeros(bitmask_words(k), d_out, dtype=torch.int64, device=idx.device)
    words.scatter_add_(0, idx >> 5, torch.ones_like(idx) << (idx & 31))  # distinct atoms: the add is an or
    bitmask = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement wrap
    return bitmask, values.gather(0, order), word_offsets_for(bitmask, s)


def _ranks(bitmask: Tensor, k: int, s: int):
    """(bits (k, d_out) bool, rank (k, d_out) int64): rank[a, j] = the position in values of atom a of column j
    (clamped into [0, s) where the bit is not set, so it can index a gather without a sync)."""
    bits = unpack_bitmask(bitmask, k)
    rank = bits.cumsum(0) - 1
    return bits, rank.clamp_(0, max(s - 1, 0))


def bitmask_to_dense(bitmask: Tensor, values: Tensor, k: int) -> Tensor:
    """Dense S (k x d_out, values' dtype; a transposed view of a d_out x k tensor) of the bitmask format."""
    d_out = bitmask.shape[1]
    shifts = torch.arange(BITMASK_WORD_BITS, dtype=torch.int32, device=bitmask.device)
    # column-major: the set bits of S^T in row-major order are each column's atoms in ascending order, i.e. the order
    # of values^T's entries, so one masked_scatter places them (no sync: no data-dependent shape)
    bits_t = ((bitmask.T.unsqueeze(-1) >> shifts) & 1).bool().reshape(d_out, -1)[:, :k]
    dense_t = torch.zeros((d_out, k), dtype=values.dtype, device=values.device)
    return dense_t.masked_scatter_(bits_t, values.T.contiguous()).T


def bitmask_to_indices(bitmask: Tensor, k: int, s: int) -> Tensor:
    """ELL indices (s, d_out) int64, ascending in each column, of a bitmask with s set bits per column (the values
    are already in that order)."""
    bits, rank = _ranks(bitmask, k, s)
    atoms = torch.arange(k, device=bitmask.device)[:, None].expand_as(rank)
    # each (rank, column) slot gets the largest atom mapped to it: its set atom (unset atoms carry 0, or share the
    # rank of the set atom before them, which is larger)
    out = torch.zeros(s, bitmask.shape[1], dtype=torch.int64, device=bitmask.device)
    return out.scatter_reduce_(0, rank, torch.where(bits, atoms, 0), "amax")


def check_bitmask_data(bitmask: Tensor, k: int, s: int, word_offsets: Optional[Tensor] = None,
                       name: str = "bitmask") -> None:
    """Raise ValueError unless every column of ``bitmask`` has exactly s set bits, none at atoms >= k, and
    ``word_offsets`` (when given) are its exclusive prefix popcounts. Reads the data (a host sync on a GPU)."""
    counts = word_popcounts(bitmask)
    if k % BITMASK_WORD_BITS:
        high = bitmask[-1].to(torch.int64) & (((1 << 32) - 1) ^ ((1 << (k % BITMASK_WORD_BITS)) - 1))
        if bool((high != 0).any()):
            raise ValueError(f"{name} sets bits of atoms >= k={k} (the last word's top bits must be zero)")
    per_column = counts.sum(0)
    if bool((per_column != s).any()):
        raise ValueError(f"{name} must set exactly s={s} bits per column (one per row of values), got between "
                         f"{int(per_column.min())} and {int(per_column.max())}")
    if word_offsets is not None and not torch.equal(word_offsets.to(torch.int32), counts.cumsum(0, dtype=torch.int32)
                                                    - counts):
        raise ValueError("word_offsets must hold each column's set bits before each word (word_offsets_for(bitmask, s))")


OFFSET_DTYPES = (torch.uint8, torch.int16, torch.int32)
# On CUDA, triton first: its kernels decode S in registers and read the codes once, which decode sizes (bound by the
# bytes read) need; cuda decodes S to a dense S^T per call (k d_out more writes and reads) around cuBLAS, which can
# only pay where the GEMM dominates. The measured auto (weightkit.backend) picks per shape.
# auto by measurement per regime (weightkit/backend.py, "Measured choice"): the fused Triton kernels against the
# cuda backend's decode + cuBLAS, per token bucket, S's shape (k atoms, s values per column, d_out) and dtypes; the
# matmul precision counts for fp32 (TF32 speeds up cuBLAS and the Triton dots alike, not the decode).


def _fwd_regime(z, values, bitmask, word_offsets):
    dtype = z.dtype
    return (token_bucket(z.shape[0]), z.shape[1], values.shape, dtype, values.dtype,
            dtype is torch.float32 and tf32_allowed())


def _bwd_regime(grad, z, values, bitmask, word_offsets):
    return _fwd_regime(z, values, bitmask, word_offsets)


_BM_FWD = KernelTable("dict_bitmask_matmul", cuda_order=("triton", "cuda"), regime=_fwd_regime)
_BM_BWD = KernelTable("dict_bitmask_matmul_backward", cuda_order=("triton", "cuda"), regime=_bwd_regime)


def _check_bitmask_args(z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> None:
    dev = z.device
    if (z.dtype in FLOAT_DTYPES and values.dtype in FLOAT_DTYPES and bitmask.dtype == torch.int32
            and word_offsets.dtype in OFFSET_DTYPES and z.dim() == 2 and values.dim() == 2 and bitmask.dim() == 2
            and values.device == dev and bitmask.device == dev and word_offsets.device == dev and z.numel()
            and values.numel() and bitmask.shape == word_offsets.shape and values.shape[1] == bitmask.shape[1]
            and bitmask.shape[0] == bitmask_words(z.shape[1]) and values.shape[0] <= z.shape[1]
            and values.shape[0] <= _OFFSET_MAX[word_offsets.dtype]):
        return  # the usual valid call, in one expression; the checks below name the error
    check_tensor("z", z, dtypes=FLOAT_DTYPES, ndim=2, nonempty=False)  # (no tokens: an empty result, as nn.Linear's)
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    check_tensor("bitmask", bitmask, dtypes=(torch.int32,), ndim=2, device=dev)
    check_tensor("word_offsets", word_offsets, dtypes=OFFSET_DTYPES, ndim=2, device=dev)
    k, (s, d_out) = z.shape[1], values.shape
    if bitmask.shape != (bitmask_words(k), d_out):
        raise ValueError(f"bitmask must have shape (ceil(k/32), d_out) = {(bitmask_words(k), d_out)} for z with k={k} "
                         f"columns and values with d_out={d_out} columns, got {tuple(bitmask.shape)}")
    if word_offsets.shape != bitmask.shape:
        raise ValueError(f"word_offsets {tuple(word_offsets.shape)} must have bitmask's shape {tuple(bitmask.shape)}")
    if s > k:
        raise ValueError(f"values has s={s} rows, more than the k={k} atoms (columns of z)")
    if s > _OFFSET_MAX[word_offsets.dtype]:
        raise TypeError(f"word_offsets of dtype {str(word_offsets.dtype).replace('torch.', '')} cannot count s={s} "
                        f"nonzeros; use {str(offset_dtype_for(s)).replace('torch.', '')}")


_OFFSET_MAX = {torch.uint8: 255, torch.int16: 32767, torch.int32: 2 ** 31 - 1}


def _check_bitmask_data(z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> None:
    check_bitmask_data(bitmask, z.shape[1], values.shape[0], word_offsets)
    require_finite("z", z)


@_BM_FWD.register("reference")
def dict_bitmask_matmul_reference(z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> Tensor:
    compute = torch.promote_types(z.dtype, torch.float32)
    S = bitmask_to_dense(bitmask, values.to(compute), z.shape[1])
    return (z.to(compute) @ S).to(z.dtype)


@_BM_BWD.register("reference")
def dict_bitmask_matmul_backward_reference(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor,
                                           word_offsets: Tensor):
    compute = torch.promote_types(z.dtype, torch.float32)
    k, s = z.shape[1], values.shape[0]
    bits, rank = _ranks(bitmask, k, s)
    g = grad.to(compute)
    S = torch.where(bits, values.to(compute).gather(0, rank), torch.zeros((), dtype=compute, device=z.device))
    grad_z = g @ S.T
    grad_S = torch.where(bits, z.to(compute).T @ g, torch.zeros((), dtype=compute, device=z.device))
    grad_values = torch.zeros((s, values.shape[1]), dtype=compute, device=z.device).scatter_add_(0, rank, grad_S)
    return grad_z.to(z.dtype), grad_values.to(values.dtype)


for _name, _module in (("cpu", cpu_dictionary), ("cuda", cuda_dictionary), ("triton", triton_dictionary)):
    _BM_FWD.register(_name)(_module.dict_bitmask_matmul)
    _BM_BWD.register(_name)(_module.dict_bitmask_matmul_backward)


def _bm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bm_backward(ctx, grad):
    z, values, bitmask, word_offsets = ctx.saved_tensors
    gz, gv = _bm_bwd_op(grad.contiguous(), z, values, bitmask, word_offsets)
    return gz, gv, None, None


_bm_fwd_op = define(
    "dict_bitmask_matmul(Tensor z, Tensor values, Tensor bitmask, Tensor word_offsets) -> Tensor",
    table=_BM_FWD, check=_check_bitmask_args, debug_check=_check_bitmask_data,
    fake=lambda z, values, bitmask, word_offsets: z.new_empty((z.shape[0], values.shape[1])),
    backward=_bm_backward, setup_context=_bm_setup, empty=lambda z, *_: z.shape[0] == 0)

_bm_bwd_op = define(
    "dict_bitmask_matmul_backward(Tensor grad, Tensor z, Tensor values, Tensor bitmask, Tensor word_offsets) "
    "-> (Tensor, Tensor)",
    table=_BM_BWD, check=lambda grad, z, values, bitmask, word_offsets: _check_bitmask_grad(grad, z, values, bitmask,
                                                                                           word_offsets),
    fake=lambda grad, z, values, bitmask, word_offsets: (torch.empty_like(z), torch.empty_like(values)),
    empty=lambda grad, z, *_: z.shape[0] == 0)


def _check_bitmask_grad(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> None:
    _check_bitmask_args(z, values, bitmask, word_offsets)
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, ndim=2, device=z.device, nonempty=False)
    if grad.shape != (z.shape[0], values.shape[1]):
        raise ValueError(f"grad must have the output's shape {(z.shape[0], values.shape[1])}, got {tuple(grad.shape)}")


def dict_bitmask_matmul(z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> Tensor:
    """``y = z S`` with S (k x d_out) in the bitmask format (see the section comment above: k = z.shape[1], s =
    values.shape[0]); differentiable in z and values, the bitmask is frozen. Backends: ``reference`` (the spec,
    plain torch), ``cpu`` (the compiled CPU kernels: auto's choice on CPU), ``triton`` (CUDA, or CPU under
    TRITON_INTERPRET=1; the fused kernels, auto's first choice on CUDA) and ``cuda`` (S^T decoded to dense + cuBLAS;
    auto's choice on CUDA where Triton is missing)."""
    return _bm_fwd_op(z, values, bitmask, word_offsets)
