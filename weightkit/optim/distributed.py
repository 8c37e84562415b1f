"""GaLore / Q-GaLore under torch.distributed: DDP, layer-wise GaLore with a DDP communication hook, FSDP2.

DDP (``torch.nn.parallel.DistributedDataParallel``)
    Works with ``GaLoreAdamW``, ``GaLoreAdamW8bit`` and ``QGaLoreAdamW8bit`` unchanged. DDP averages the gradients,
    so every rank holds bit-identical gradients (gloo and NCCL return the same reduced buffer to every rank) and
    computes the same projectors: the exact SVD is a deterministic function of its input, and the randomized SVD's
    test matrix is seeded by (seed, parameter index, step), not by any per-process RNG. Q-GaLore's stochastic
    rounding is keyed the same way. Two helpers check or force that agreement:

    * :func:`broadcast_projectors` copies every state entry of the GaLore parameters (bases, moments, step, ...)
      from rank ``src`` to all ranks, creating missing entries, e.g. after rank 0 alone loaded a checkpoint;
    * :func:`check_replicas_agree` all-gathers a SHA-256 of every parameter/buffer (module) or state tensor
      (optimizer) and raises a ``RuntimeError`` naming the first one that differs between ranks.

    ``Int8Linear`` weights (Q-GaLore) present a float dtype to autograd: their gradient is an ordinary ``.grad``,
    which DDP averages with the others (``all_reduce_float_grads`` is deprecated and does nothing). DDP's initial
    broadcast of the parameters sends their dequantized values, which every rank rounds back to int8 (to nearest,
    with fresh absmax scales) identically.

Layer-wise GaLore under DDP (``LayerwiseGaLore`` and its hook live in weightkit.optim.layerwise)
    ``LayerwiseGaLore`` normally steps each parameter from a post-accumulate-grad hook. Under DDP that hook fires
    with the *local* gradient, before DDP's bucketed all-reduce, so ranks would diverge. Instead build it with
    ``hooks=False`` and register :func:`ddp_layerwise_comm_hook` (also ``LayerwiseGaLore.ddp_comm_hook()``) as the
    DDP communication hook: it all-reduces (averages) each bucket and, once that bucket's reduction completes, steps
    the parameters of that bucket with their averaged gradients (slices of the reduced bucket, no copy), while
    backward continues on the other buckets. Call ``opt.zero_grad()`` after each backward (DDP copies the reduced
    bucket back into ``.grad`` at the end of backward; with ``gradient_as_bucket_view=True`` ``.grad`` is a view of
    the bucket and nothing is copied). DDP keeps its own bucket buffers (one full copy of the gradients), so under
    DDP layer-wise mode buys overlap of the optimizer with backward, not gradient memory. For gradient accumulation
    use ``ddp.no_sync()`` for all but the last micro-batch (``accumulation_steps`` must be 1 with the hook).

FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters sharded by rows, ``Shard(0)``)
    Use :class:`ShardedGaLoreAdamW` (or :class:`ShardedGaLoreAdamW8bit`): the GaLore step with
    :class:`ShardedWeight` (part (c), see weightkit.optim.galore) in front of the float weight part, so that with
    plain tensors they behave exactly as GaLoreAdamW / GaLoreAdamW8bit. For an m x n weight sharded into row blocks W_i (m_i x n, m_i ~ m / world) with
    gradient shards G_i (already averaged by FSDP's reduce-scatter):

    * refresh (every ``update_proj_gap`` steps): the full gradient is all-gathered (``grad.full_tensor()``, a
      transient m x n buffer per rank), every rank computes the basis and rank 0's copy is broadcast (so ranks agree
      even across machines whose LAPACK differ); a NaN/Inf in any shard is seen by every rank;
    * ``right`` projection (P: r x n; 'std' for m >= n): R_i = G_i P^T (m_i x r) is local, Adam moments shard with
      the rows, W_i <- decay W_i - lr' N_i P is local. No communication besides the refresh;
    * ``left`` projection (P: m x r; 'std' for m < n): R = sum_i P_i^T G_i (r x n) needs one all-reduce of r x n per
      step; each rank keeps only its rows P_i (m_i x r) of the basis and a replica of the r x n moments;
    * ``full`` projection: R = sum_i U_i^T G_i V (r x r), one r x r all-reduce; U sharded by rows, V replicated;
    * non-GaLore parameters (biases, norms, embeddings): AdamW on the local shard.

    Optimizer memory per rank for an m x n weight at rank r, world size W (float32 moments, 4 bytes each):
    right: 2 (m/W) r + r n floats; left: 2 r n + (m/W) r floats; plus, only during a refresh, the full m x n
    gradient and the SVD's workspace. For the usual 'std' choice this is 2 max(m,n) r / W + min(m,n) r when the
    larger side is the sharded one, i.e. the low-rank state shards with the weight except the r x n basis (right)
    or the r x n moments (left). Non-finite checks are combined over ranks with one all-reduce of a flag per step.
    The optimizer state holds plain (local) tensors: save and load ``optimizer.state_dict()`` per rank together
    with the sharded model state. Only 1-D meshes and ``Shard(0)``/``Replicate`` placements are supported.
    ``Int8Linear`` weights shard by rows under ``fully_shard`` (each rank holds int8 rows and their scales; the
    all-gather moves int8 values and scales, ``Int8Weight.fsdp_pre_all_gather``) and train with torch optimizers
    (tests/nn/test_int8_training.py); the sharded GaLore presets are not tested on them.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops.galore import galore_adam_update_reference
from .galore import HOST_KEYS, GaLoreAdamW, GaLoreAdamW8bit, GaLoreParts
from .layerwise import LayerwiseGaLore, ddp_layerwise_comm_hook
from .weights import FloatWeight, LowRankUpdate

__all__ = ["broadcast_projectors", "check_replicas_agree", "all_reduce_float_grads", "ddp_layerwise_comm_hook",
           "ShardedGaLoreAdamW", "ShardedGaLoreAdamW8bit"]


# -- helpers ---------------------------------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _optimizers(optimizer) -> List[torch.optim.Optimizer]:
    if isinstance(optimizer, LayerwiseGaLore):
        return list(optimizer.optimizers)
    return [optimizer]


def _galore_params(opt: torch.optim.Optimizer, galore_only: bool = True) -> Iterable[Tuple[str, Tensor]]:
    """(name, parameter) of the 2-D parameters of GaLore groups (or of all parameters), named by their index."""
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if not galore_only or ("rank" in group and p.dim() == 2):
                yield f"param {i}", p
            i += 1


def _world(group) -> int:
    return dist.get_world_size(group)


# -- DDP: agreement ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def broadcast_projectors(optimizer, src: int = 0, group=None, galore_only: bool = False) -> int:
    """Broadcast the optimizer state of every GaLore parameter (bases, moments, counters) from rank ``src``.

    ``optimizer`` is a GaLoreAdamW (or subclass) or a LayerwiseGaLore. Entries missing on other ranks are created
    with the source's shapes and dtypes, entries the source lacks are removed, so afterwards every rank holds the
    source's state exactly. By default the AdamW state of the other parameters (biases, norms) is broadcast too, so
    that a state loaded on ``src`` alone is complete everywhere; ``galore_only=True`` limits it to the 2-D
    parameters of GaLore groups. Hyperparameters (``param_groups``: lr, ...) are not broadcast. Sharded (DTensor)
    parameters are skipped: their state is per-shard by design. Returns the number of tensors broadcast. ``src``
    is a global rank, as in ``torch.distributed.broadcast``."""
    count = 0
    for opt in _optimizers(optimizer):
        params = [(name, p) for name, p in _galore_params(opt, galore_only) if not _is_sharded(p)]
        meta = None
        if dist.get_rank() == src:
            meta = []
            for _, p in params:
                entries = {}
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, Tensor):
                        entries[k] = ("tensor", tuple(v.shape), v.dtype)
                    else:
                        entries[k] = ("value", v)
                meta.append(entries)
        box = [meta]
        dist.broadcast_object_list(box, src=src, group=group)
        meta = box[0]
        for (_, p), entries in zip(params, meta):
            state = opt.state[p]
            for k in [k for k in state if k not in entries]:
                del state[k]
            for k, desc in entries.items():
                if desc[0] == "value":
                    state[k] = desc[1]
                    continue
                _, shape, dtype = desc
                t = state.get(k)
                # the collective runs on the parameter's device (NCCL takes CUDA tensors only); shapes (HOST_KEYS)
                # are kept on the CPU afterwards, where the optimizer reads them without a sync
                home = torch.device("cpu") if k in HOST_KEYS else p.device
                if dist.get_rank() == src:
                    buf = t.to(p.device).contiguous()
                    dist.broadcast(buf, src=src, group=group)
                    count += 1
                    continue
                if not (isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous()
                        and t.device == p.device):
                    t = torch.empty(shape, dtype=dtype, device=p.device)
                dist.broadcast(t, src=src, group=group)
                state[k] = t.to(home)
                count += 1
    return count


def _digest(t: Tensor) -> str:
    data = t.detach()
    if _is_dtensor(data):
        data = data.to_local()
    data = data.cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _named_tensors(obj) -> List[Tuple[str, Tensor]]:
    if isinstance(obj, torch.nn.Module):
        out = [(f"parameter {n}", p) for n, p in obj.named_parameters()]
        out += [(f"buffer {n}", b) for n, b in obj.named_buffers()]
        return [(n, t) for n, t in out if not _is_sharded(t)]
    out = []
    for j, opt in enumerate(_optimizers(obj)):
        prefix = f"optimizer {j} " if isinstance(obj, LayerwiseGaLore) else ""
        i = 0
        for group in opt.param_groups:
            for p in group["params"]:
                if not _is_sharded(p):
                    for k, v in sorted(opt.state.get(p, {}).items()):
                        if isinstance(v, Tensor):
                            out.append((f"{prefix}param {i} (shape {tuple(p.shape)}) state {k!r}", v))
                        else:
                            out.append((f"{prefix}param {i} (shape {tuple(p.shape)}) state {k!r}",
                                        torch.frombuffer(bytearray(repr(v).encode()), dtype=torch.uint8)))
                i += 1
    return out


def _is_sharded(t) -> bool:
    if not _is_dtensor(t):
        return False
    return any(not pl.is_replicate() for pl in t.placements)


def check_replicas_agree(optimizer_or_module, group=None) -> None:
    """Raise ``RuntimeError`` unless every rank of ``group`` holds bit-identical tensors.

    For a module: its parameters and buffers; for an optimizer (or LayerwiseGaLore): every state entry of every
    parameter (bases, moments, step). Sharded DTensors are skipped. One all-gather of SHA-256 digests."""
    named = _named_tensors(optimizer_or_module)
    mine = [(n, _digest(t)) for n, t in named]
    gathered: List = [None] * _world(group)
    dist.all_gather_object(gathered, mine, group=group)
    ref = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        if len(other) != len(ref):
            names_ref, names_other = [n for n, _ in ref], [n for n, _ in other]
            missing = [n for n in names_ref if n not in names_other] + [n for n in names_other if n not in names_ref]
            raise RuntimeError(f"replicas disagree: rank 0 has {len(ref)} tensors, rank {rank} has {len(other)} "
                               f"(first difference: {missing[:1] or 'order'})")
        for (name, d0), (name_r, dr) in zip(ref, other):
            if name != name_r:
                raise RuntimeError(f"replicas disagree: rank 0 has {name}, rank {rank} has {name_r} at the same place")
            if d0 != dr:
                raise RuntimeError(f"replicas disagree: {name} differs between rank 0 and rank {rank}")


def all_reduce_float_grads(module: torch.nn.Module, group=None) -> int:
    """Deprecated, does nothing and returns 0: the gradient of an Int8Linear weight is its ordinary ``.grad``,
    which DistributedDataParallel averages itself."""
    warnings.warn("all_reduce_float_grads is deprecated and does nothing: Int8Linear weight gradients are ordinary "
                  ".grad tensors that DistributedDataParallel all-reduces itself; remove the call",
                  DeprecationWarning, stacklevel=2)
    return 0


# -- FSDP2: DTensor parameters -------------------------------------------------------------------------------------------
def _row_range(m: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows of a Shard(0) DTensor held by ``rank`` (torch.chunk's split: ceil(m / world) rows per rank)."""
    chunk = -(-m // world)
    start = min(rank * chunk, m)
    return start, min(start + chunk, m)


class ShardedWeight(FloatWeight):
    """Part (c) of the GaLore step for FSDP2 parameters (DTensor, 1-D mesh, Shard(0) or Replicate): the step reads
    the local gradient shard and writes the local weight shard; see the module docstring for the communication."""

    def __init__(self, sync_basis: bool = True):
        self.sync_basis = sync_basis  # broadcast rank 0's new basis (agreement across heterogeneous machines)

    def accepts(self, p: Tensor) -> bool:
        return _is_dtensor(p)

    @staticmethod
    def layout(p: Tensor):
        """(kind, process group, mesh rank, world) for a DTensor parameter: kind 'shard0' or 'replicate'."""
        mesh = p.device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError(f"Sharded GaLore supports 1-D device meshes, got a {mesh.ndim}-D mesh")
        placement = p.placements[0]
        group = mesh.get_group()
        if placement.is_replicate():
            kind = "replicate"
        elif placement.is_shard() and placement.dim == 0:
            kind = "shard0"
        else:
            raise NotImplementedError(f"Sharded GaLore supports Shard(0) and Replicate placements, got {placement}")
        return kind, group, dist.get_rank(group), dist.get_world_size(group)

    def check_grad(self, p: Tensor, grad: Tensor) -> None:
        if not _is_dtensor(grad):
            raise RuntimeError("a DTensor parameter needs a DTensor gradient (and a tensor one a tensor)")

    def local(self, t: Tensor) -> Tensor:
        return t.to_local() if _is_dtensor(t) else t

    def check_local(self, p: Tensor, local: Tensor) -> None:
        kind, _, rank, world = self.layout(p)
        m, n = p.shape
        start, end = (0, m) if kind == "replicate" else _row_range(m, rank, world)
        if local.shape[0] != end - start:
            raise RuntimeError(f"local shard of a {(m, n)} parameter has {local.shape[0]} rows, expected "
                               f"{end - start} (rows {start}:{end} of Shard(0) on {world} ranks)")

    def gather(self, p: Tensor, grad: Tensor) -> Tensor:
        return grad.full_tensor()  # a transient m x n buffer per rank, at refreshes only

    def share_basis(self, p: Tensor, ortho: Tensor, ortho_right, side: str):
        kind, pg, rank, world = self.layout(p)
        if self.sync_basis and kind == "shard0" and world > 1:
            src = dist.get_global_rank(pg, 0)
            for t in (ortho, ortho_right):
                if t is not None:
                    dist.broadcast(t, src=src, group=pg)
        if side in ("left", "full"):
            start, end = (0, p.shape[0]) if kind == "replicate" else _row_range(p.shape[0], rank, world)
            ortho = ortho[start:end].contiguous()  # each rank keeps its rows of U
        return ortho, ortho_right

    def reduce_low(self, p: Tensor, low: Tensor, side: str) -> Tensor:
        kind, pg, _, world = self.layout(p)
        if side != "right" and kind == "shard0" and world > 1:
            dist.all_reduce(low, group=pg)  # sum over row blocks: the projection of the whole gradient
        return low

    def validates_shapes(self, p: Tensor) -> bool:
        return self.layout(p)[0] != "shard0"  # sharded state has local shapes; its values are still checked

    def any_bad(self, params, bad: bool) -> bool:
        groups = {id(self.layout(p)[1]): self.layout(p)[1] for p in params}
        if len(groups) > 1:
            raise NotImplementedError("all DTensor parameters of one Sharded GaLore optimizer must share one mesh")
        pg = next(iter(groups.values()), None)
        if pg is None or dist.get_world_size(pg) == 1:
            return bad
        # on the device of the sharded parameters: NCCL reduces CUDA tensors only (a fill, no host copy)
        flag = torch.full((1,), 1 if bad else 0, dtype=torch.int32, device=params[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        return int(flag) != 0  # a host sync, the step's second (after the local finite_flags)

    def apply_low_rank(self, weight: Tensor, low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                       ortho_right, side: str, u: LowRankUpdate) -> None:
        if weight.numel() == 0 and side != "full":  # an empty shard (m < world): keep the moments in step
            galore_adam_update_reference(weight, low, exp_avg, exp_avg_sq, ortho, side == "left", u.beta1, u.beta2,
                                         u.eps, u.step_size, u.scale, u.decay)
            return
        super().apply_low_rank(weight, low, exp_avg, exp_avg_sq, ortho, ortho_right, side, u)

    def apply_direction(self, weight: Tensor, direction: Tensor, ortho: Tensor, ortho_right, side: str,
                        u: LowRankUpdate) -> None:
        if weight.numel() == 0 and side != "full":  # an empty shard (m < world): its moments were updated already
            return
        super().apply_direction(weight, direction, ortho, ortho_right, side, u)


_UNCHANGED_ANY_RANK = "no parameter or optimizer state was changed on any rank"


class ShardedGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW for FSDP2 (DTensor, Shard(0)) parameters; see the module docstring for the design and memory."""

    _UNCHANGED = _UNCHANGED_ANY_RANK

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, parts=GaLoreParts(weights=(ShardedWeight(), FloatWeight())), **kwargs)


class ShardedGaLoreAdamW8bit(GaLoreAdamW8bit):
    """GaLoreAdamW8bit for FSDP2 parameters: the 8-bit moments are quantized per shard (blocks of the local rows)."""

    _UNCHANGED = _UNCHANGED_ANY_RANK

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, parts=GaLoreParts(weights=(ShardedWeight(), FloatWeight())), **kwargs)
