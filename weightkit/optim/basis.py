"""Part (a) of the GaLore step: how a projection basis is stored between refreshes.

A basis arrives as float32 tensors from :func:`weightkit.optim.projector.compute_basis` (P for a one-sided
projection; U and Vh for 'full') and is used as float32 by the projection. In between it lives in the parameter's
optimizer state, in one of two formats:

* :class:`FloatBasis` -- ``state["ortho"]`` (and ``state["ortho_right"]`` for 'full') in the group's ``proj_dtype``:
  float32 as galore-torch (None), or bfloat16 / float16, which halves the bytes. Loading a float32 basis is free.
* :class:`Int4Basis` -- Q-GaLore's INT4 storage (``weightkit.ops.int4``: two values per byte, per-group scale and
  zero of ``proj_group_size`` elements): ``ortho_q``, ``ortho_scale``, ``ortho_zero`` and the shape ``ortho_shape``
  (an int64 CPU tensor, read on the host without a device sync). One-sided bases only. ``load`` gives the packed
  basis (:class:`PackedInt4`), not a dequantized copy: the projection P^T G (or G P^T) runs ``int4_matmul`` on it,
  the int8 write-back ``int8_sr_lowrank_update_`` reads it tile by tile, and only a part that needs a float basis
  (a float weight's ``galore_adam_update_``) dequantizes it, for that call (``dense``).

Each format also projects a gradient with its basis (``project``) and gives the basis as float32 tensors to the
parts that need them (``dense``). Each format writes its entries into a dict (the parameter's state, or a dict of pending entries that the step
merges into the state once the whole step is known to be finite), reads them back as float32, and checks the
entries of a checkpoint before anything is loaded. The entry names are the checkpoint format: they do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops.galore import bf16_parts, mm_float32
from ..backends._blocked import float32_by_blocks, split3_bf16, split3_mm_float32, split_products_apply
from ..ops.int4 import dequantize_int4, int4_matmul, quantize_int4

PROJ_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Basis = Tuple[Tensor, Optional[Tensor]]


def resolve_proj_dtype(proj_dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """float32 for None; a name ('bfloat16') or a torch.dtype among float32/bfloat16/float16."""
    if proj_dtype is None:
        return torch.float32
    if isinstance(proj_dtype, str) and proj_dtype in PROJ_DTYPES:
        return PROJ_DTYPES[proj_dtype]
    if isinstance(proj_dtype, torch.dtype) and proj_dtype in PROJ_DTYPES.values():
        return proj_dtype
    raise ValueError(f"proj_dtype={proj_dtype!r} is not one of None, {', '.join(PROJ_DTYPES)}")


def host_shape(state: Dict, key: str) -> tuple:
    """A shape kept in the state as a small int64 tensor, read without a device sync: a copy that ended up on a
    device (a state moved by hand, an old checkpoint) is brought back to the CPU once."""
    t = state[key]
    if t.device.type != "cpu":
        t = state[key] = t.cpu()
    return tuple(t.tolist())


# A float32 gradient is split too (three bf16 parts, six products) where the basis has at least
# SPLIT_FLOAT32_MIN_RANK columns and the projection makes at least SPLIT_FLOAT32_MIN_FLOPS (2 m n r). The split costs
# one pass over G making its parts (weightkit::bf16_parts: 10 bytes moved a value; torch's elementwise ops took four
# passes and about 30) and six bf16 products instead of one strict-fp32 one; the strict GEMM's time grows with r, the
# pass's does not. An H200 estimate (cuBLAS strict fp32 ~51 TFLOP/s, as the 2026-11-26 step rows imply; bf16 ~700;
# copies ~4.2 TB/s), per value of G: strict 2r / 51e12 s, split 10 / 4.2e12 + 12 r / 700e12 s: even at r ~ 110,
# ~1.5x faster at r = 256, ~1.75x at r = 512 (with the four passes: even at r ~ 320, ~1.25x at 512). Kept at 512
# until measured: a skinny bf16 GEMM (r rows of output) may run well below 700 TFLOP/s. Below 2^33 FLOPs the launches
# (about six a projection instead of one) weigh as well. (galore_issue25's `projection` rows measure r1024, r512,
# 4096^2 r256 and a 350M model's 1024 x 2736 r256, each with G's parts by every bf16_parts backend.)
SPLIT_FLOAT32_MIN_RANK = 512
SPLIT_FLOAT32_MIN_FLOPS = 1 << 33


def split3_applies(grad: Tensor, rank: int) -> bool:
    """Whether a float32 basis of ``rank`` columns projects the gradient ``grad`` by three bf16 parts
    (FloatBasis.project) on a GPU whose float32 matmuls may not use TF32, with torch's float32-output mm there
    (backends/_blocked.split_products_apply): a bf16 or float16 gradient always, a float32 one from
    SPLIT_FLOAT32_MIN_RANK and SPLIT_FLOAT32_MIN_FLOPS."""
    if grad.dtype == torch.float32:
        if rank < SPLIT_FLOAT32_MIN_RANK or 2 * grad.numel() * rank < SPLIT_FLOAT32_MIN_FLOPS:
            return False
    elif grad.dtype not in (torch.bfloat16, torch.float16):
        return False
    return grad.is_cuda and split_products_apply(grad.device)


def basis_rank(shape, side: str) -> int:
    """The rank of a one-sided basis of ``shape``: m x r (left) or r x n (right)."""
    return shape[1] if side == "left" else shape[0]


def split_projection(grad: Tensor, side: str, ortho: Tensor) -> Tensor:
    """R = P^T G (left) or G P^T (right) of a float32 basis ``ortho`` (m x r or r x n) where :func:`split3_applies`:
    P^T in three bf16 parts (small beside G), multiplied with G (or its parts) on bf16 tensor cores with float32
    results (backends/_blocked.split3_mm_float32; a float32 or float16 G's parts by weightkit.ops.galore.bf16_parts,
    one CUDA or Triton pass on a GPU)."""
    return split3_mm_float32(grad, split3_bf16(ortho.T), side == "right", grad.is_cuda, stack=bf16_parts)


def _check_sizes(where: str, state: Dict, sizes) -> None:
    for key, size in sizes:
        t = state.get(key)
        if not isinstance(t, Tensor) or t.numel() != size:
            raise ValueError(f"{where}: saved {key} must hold {size} values, got "
                             f"{None if not isinstance(t, Tensor) else t.numel()}")


class FloatBasis:
    """The basis as float tensors in the group's ``proj_dtype`` (see the module docstring)."""

    keys = ("ortho", "ortho_right")
    host_keys = ()
    group_keys: Dict = {}

    def __init__(self, proj_dtype: Union[None, str, torch.dtype] = None):
        self.fixed_dtype = None if proj_dtype is None else resolve_proj_dtype(proj_dtype)

    def dtype(self, group: Dict) -> torch.dtype:
        return self.fixed_dtype if self.fixed_dtype is not None else resolve_proj_dtype(group.get("proj_dtype"))

    def check_group(self, group: Dict) -> None:
        self.dtype(group)  # raises on a bad proj_dtype

    def store(self, entries: Dict, ortho: Tensor, ortho_right: Optional[Tensor], group: Dict) -> None:
        dtype = self.dtype(group)
        entries["ortho"] = ortho.to(dtype)
        if ortho_right is not None:
            entries["ortho_right"] = ortho_right.to(dtype)

    def load(self, entries: Dict, group: Dict) -> Basis:
        """The stored basis as float32 tensors (no copy when stored in float32)."""
        right = entries.get("ortho_right")
        return entries["ortho"].to(torch.float32), (None if right is None else right.to(torch.float32))

    @staticmethod
    def project(grad: Tensor, side: str, basis: Basis) -> Tensor:
        """R, the float32 low-rank gradient of ``grad``: P^T G, G P^T or P^T G Q^T.

        A float32 basis: a float32 product (TF32 on a GPU only where the user allows it: cuBLAS follows
        ``torch.backends.cuda.matmul.allow_tf32``). A bfloat16 / float16 basis (kept in proj_dtype and used as
        stored, see weightkit.optim.projector.projection_basis_dtype): the gradient is rounded to that dtype and the
        product runs on 16-bit operands with float32 accumulation and a float32 result (16-bit tensor cores on a
        GPU; on the CPU the operands are upcast, the same products).

        A float32 basis and a bfloat16 gradient on a GPU where TF32 is not allowed (a bf16 model under torch's
        default matmul setting): the basis split in three bf16 parts (hi + mid + lo == P exactly), three exact
        products on bf16 tensor cores with float32 results, summed in float32 (backends/_blocked.split3_mm_float32):
        the float32 projection's accuracy at three bf16 GEMMs' cost instead of a strict-fp32 GEMM's (cuBLAS's FMA
        path, several times slower) on a float32 copy of G; where this torch's mm has no float32 output for bf16,
        as below. A float16 gradient likewise, G split in two bf16 parts a block at a time: five products. A float32
        gradient (a float32 model, or bf16 autocast's float32 parameters) of a large enough projection
        (SPLIT_FLOAT32_MIN_RANK, SPLIT_FLOAT32_MIN_FLOPS) likewise, G split in three bf16 parts a block at a time:
        six products in three GEMMs, instead of the strict-fp32 GEMM."""
        ortho, ortho_right = basis
        if ortho.dtype != torch.float32:
            g = grad.to(ortho.dtype)
            if side == "left":
                return mm_float32(ortho.T, g, g.is_cuda)
            if side == "right":
                return mm_float32(g, ortho.T, g.is_cuda)
            return mm_float32(ortho.T, g, g.is_cuda) @ ortho_right.to(torch.float32).T
        if side in ("left", "right") and split3_applies(grad, basis_rank(ortho.shape, side)):
            return split_projection(grad, side, ortho)
        if side == "left":  # by blocks of columns of a large 16-bit gradient (backends/_blocked.float32_by_blocks)
            return float32_by_blocks(grad, 1, (ortho.shape[1], grad.shape[1]), lambda g: ortho.T @ g)
        if side == "right":
            return float32_by_blocks(grad, 0, (grad.shape[0], ortho.shape[0]), lambda g: g @ ortho.T)
        g = grad.to(torch.float32)
        return ortho.T @ g @ ortho_right.T

    @staticmethod
    def dense(basis: Basis) -> Basis:
        return basis

    def has(self, state: Dict) -> bool:
        return "ortho" in state

    def validate(self, where: str, state: Dict, shapes: Dict[str, tuple], group: Dict) -> None:
        """``shapes``: the expected shapes of 'ortho' and 'ortho_right' (of this process's part of the weight)."""
        for key in self.keys:
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shapes[key]):
                raise ValueError(f"{where}: saved {key} has shape {tuple(t.shape)}, expected {tuple(shapes[key])}")


@dataclass(frozen=True)
class PackedInt4:
    """An INT4 basis as stored (weightkit.ops.int4's format): ``shape`` = (m, r) for a left projection, (r, n) for
    a right one."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    group_size: int
    shape: Tuple[int, int]

    def dequantize(self) -> Tensor:
        return dequantize_int4(self.q, self.scale, self.zero, self.group_size, self.shape)


class Int4Basis:
    """Q-GaLore's INT4 basis, ``proj_group_size`` elements per quantization group (see the module docstring)."""

    keys = ("ortho_q", "ortho_scale", "ortho_zero", "ortho_shape")
    host_keys = ("ortho_shape",)

    def __init__(self, proj_group_size: int = 64):
        self.group_keys = {"proj_group_size": proj_group_size}  # the default of the groups' key

    def check_group(self, group: Dict) -> None:
        size = group.get("proj_group_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
            raise ValueError(f"proj_group_size must be an even int >= 2, got {size!r}")
        if group.get("proj_type") == "full":
            raise ValueError("the INT4 basis (QGaLoreAdamW8bit) supports one-sided projections only; "
                             "proj_type='full' is not supported")

    def store(self, entries: Dict, ortho: Tensor, ortho_right: Optional[Tensor], group: Dict) -> None:
        if ortho_right is not None:
            raise ValueError("the INT4 basis stores one-sided projections only (proj_type='full' is not supported)")
        entries["ortho_q"], entries["ortho_scale"], entries["ortho_zero"] = quantize_int4(ortho,
                                                                                          group["proj_group_size"])
        entries["ortho_shape"] = torch.tensor(list(ortho.shape), dtype=torch.int64, device="cpu")

    def load(self, entries: Dict, group: Dict) -> Tuple[PackedInt4, None]:
        """The packed basis (no dequantized copy); ``dense`` dequantizes it."""
        return PackedInt4(entries["ortho_q"], entries["ortho_scale"], entries["ortho_zero"],
                          group["proj_group_size"], host_shape(entries, "ortho_shape")), None

    @staticmethod
    def project(grad: Tensor, side: str, basis: Tuple[PackedInt4, None]) -> Tensor:
        """R = P^T G (left) or G P^T (right), float32, by ``int4_matmul`` on the packed basis (dequantized tile by
        tile inside the kernel) with a float32 result: for a float32 gradient, as galore-torch and ``project`` (the
        product's precision follows torch's float32 matmul setting, see tests/optim/test_qgalore_precision.py); for
        a bf16 / fp16 one, ``out_dtype=float32``: float32 accuracy without a float32 copy of the gradient where
        Triton runs (right: its 16-bit values times the basis' integers; left: times the basis' values in three bf16
        parts, an fp16 gradient's values in two; exact products either way; the cuda backend, a 16-bit gradient
        without TF32: cuBLAS products with the basis' values in three bf16 parts, an fp16 gradient's in two);
        elsewhere it goes to float32 by blocks of 4M values (backends/_blocked.float32_by_blocks). A float32 gradient
        where FloatBasis would split it (split3_applies: a GPU without TF32, rank and FLOPs over the thresholds) is
        projected as FloatBasis does, by the basis' dequantized values (rank-sized, made for the call) in three bf16
        parts and G's three (split_projection), not by int4_matmul's strict-fp32 path."""
        packed = basis[0]
        if (grad.dtype == torch.float32 and side in ("left", "right")
                and split3_applies(grad, basis_rank(packed.shape, side))):
            return split_projection(grad, side, packed.dequantize())
        args = (packed.q, packed.scale, packed.zero, packed.group_size, packed.shape)
        if grad.dtype in (torch.bfloat16, torch.float16):
            g, out = grad, torch.float32
        else:
            g, out = grad.to(torch.float32), None
        if side == "left":  # P^T G = (G^T P)^T: G^T is a transposed view, read without a copy
            return int4_matmul(g.T, *args, transpose=True, out_dtype=out).T
        if side == "right":
            return int4_matmul(g, *args, out_dtype=out)
        raise ValueError(f"the INT4 basis supports one-sided projections only, got side={side!r}")

    @staticmethod
    def dense(basis: Tuple[PackedInt4, None]) -> Basis:
        return basis[0].dequantize(), None

    def has(self, state: Dict) -> bool:
        return "ortho_q" in state

    def validate(self, where: str, state: Dict, shapes: Dict[str, tuple], group: Dict) -> None:
        if "ortho_q" not in state:
            return
        shape = tuple(shapes["ortho"])
        saved = tuple(state["ortho_shape"].tolist()) if isinstance(state.get("ortho_shape"), Tensor) else None
        if saved != shape:
            raise ValueError(f"{where}: saved ortho_shape {saved}, expected {shape}")
        numel = shape[0] * shape[1]  # m r (left) or r n (right)
        groups = numel // group["proj_group_size"]
        _check_sizes(where, state, (("ortho_q", numel // 2), ("ortho_scale", groups), ("ortho_zero", groups)))
