"""GaLore gradient projection (Zhao et al., arXiv 2403.03507).

For a gradient G (m x n) and rank r, the projector is an orthonormal basis P of G's dominant subspace:

* ``left``  (P = U[:, :r], m x r):  R = P^T G (r x n),  back: P R
* ``right`` (P = Vh[:r], r x n):    R = G P^T (m x r),  back: R P
* ``full``  (P = (U[:, :r], Vh[:r])): R = U^T G V (r x r), back: U R Vh
* ``std`` chooses ``right`` when m >= n else ``left``, so the low-rank state is max(m, n) x r, never m x n;
  ``reverse_std`` the opposite. These follow galore-torch 1.0, so results can be compared with it.

The basis is recomputed from the current gradient every ``update_proj_gap`` steps (at steps 0, gap, 2 gap, ...
counted before the step's increment, as galore-torch does), by exact SVD or by randomized SVD (Halko et al.:
Gaussian range finder with ``oversample`` extra columns and ``power_iters`` power iterations, seeded per parameter
and step so that resuming from a checkpoint recomputes the same basis).

Projection bases are plain tensors kept in the optimizer state (``state["ortho"]`` and, for ``full``,
``state["ortho_right"]``), so ``state_dict()`` round-trips them; this module holds only the maths.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")


def projection_side(shape: Tuple[int, int], proj_type: str) -> str:
    """'left', 'right' or 'full' for a gradient of ``shape`` under ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type={proj_type!r} is not one of {', '.join(PROJ_TYPES)}")


def _randomized_svd(matrix: Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator):
    """Approximate (U[:, :rank], Vh[:rank]) of ``matrix`` (float32)."""
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=matrix.dtype).to(matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ q)
    u_small, _, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u_small)[:, :rank], vh[:rank]


def compute_basis(grad: Tensor, rank: int, side: str, svd: str = "exact", *, oversample: int = 8,
                  power_iters: int = 2, seed: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
    """The projection basis for ``grad``: (P, None) for left/right, (U, Vh) for full. Float32."""
    matrix = grad.detach().to(torch.float32)
    if svd == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, vh = u[:, :rank], vh[:rank]
    elif svd == "randomized":
        gen = torch.Generator().manual_seed(seed)
        u, vh = _randomized_svd(matrix, rank, oversample, power_iters, gen)
    else:
        raise ValueError(f"svd={svd!r} is not one of {', '.join(SVD_METHODS)}")
    if side == "left":
        return u.contiguous(), None
    if side == "right":
        return vh.contiguous(), None
    return u.contiguous(), vh.contiguous()


def project(grad: Tensor, side: str, ortho: Tensor, ortho_right: Optional[Tensor] = None) -> Tensor:
    """Low-rank gradient R (float32) of ``grad`` for a basis from :func:`compute_basis`."""
    g = grad.to(torch.float32)
    if side == "left":
        return ortho.T @ g
    if side == "right":
        return g @ ortho.T
    return ortho.T @ g @ ortho_right.T


def project_back(low: Tensor, side: str, ortho: Tensor, ortho_right: Optional[Tensor] = None) -> Tensor:
    """Full-size update from a low-rank one (the inverse map of :func:`project` on the subspace)."""
    if side == "left":
        return ortho @ low
    if side == "right":
        return low @ ortho
    return ortho @ low @ ortho_right


def subspace_similarity(a: Tensor, b: Tensor, side: str) -> float:
    """Mean |cos| between matching basis vectors of two bases (1.0 = same subspace, same order)."""
    if side == "left":
        a, b = a.T, b.T  # rows are basis vectors
    return float((a * b).sum(-1).abs().mean())


class GaLoreProjector:
    """Projection settings for one parameter group, with the maths above bound to them.

    Standalone use::

        proj = GaLoreProjector(rank=128, update_proj_gap=200, scale=0.25)
        state = {}
        low = proj.project(grad, step, state)        # refreshes state["ortho"] when due
        update = proj.project_back(low_update, state)  # scaled by ``scale``
    """

    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 svd: str = "exact", oversample: int = 8, power_iters: int = 2, seed: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be an int >= 1, got {update_proj_gap!r}")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={proj_type!r} is not one of {', '.join(PROJ_TYPES)}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd={svd!r} is not one of {', '.join(SVD_METHODS)}")
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, float(scale), proj_type
        self.svd, self.oversample, self.power_iters, self.seed = svd, oversample, power_iters, seed

    def check_shape(self, shape, name: str = "parameter") -> None:
        if len(shape) != 2:
            raise ValueError(f"GaLore projects 2-D {name}s, got shape {tuple(shape)}")
        if self.rank > min(shape):
            raise ValueError(f"rank={self.rank} is larger than min(m, n)={min(shape)} of {name} with shape {tuple(shape)}")

    def side(self, shape) -> str:
        return projection_side(tuple(shape), self.proj_type)

    def due(self, step: int, state: dict) -> bool:
        return "ortho" not in state or step % self.update_proj_gap == 0

    def refresh(self, grad: Tensor, step: int, state: dict, key: int = 0) -> None:
        ortho, ortho_right = compute_basis(grad, self.rank, self.side(grad.shape), self.svd, oversample=self.oversample,
                                           power_iters=self.power_iters, seed=hash((self.seed, key, step)) % (2**62))
        state["ortho"] = ortho
        if ortho_right is not None:
            state["ortho_right"] = ortho_right

    def project(self, grad: Tensor, step: int, state: dict, key: int = 0) -> Tensor:
        self.check_shape(grad.shape, "gradient")
        if self.due(step, state):
            self.refresh(grad, step, state, key)
        return project(grad, self.side(grad.shape), state["ortho"], state.get("ortho_right"))

    def project_back(self, low: Tensor, state: dict, shape) -> Tensor:
        return project_back(low, self.side(shape), state["ortho"], state.get("ortho_right")) * self.scale
