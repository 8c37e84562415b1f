"""GaLore gradient projection (Zhao et al., arXiv 2403.03507).

For a gradient G (m x n) and rank r, the projector is an orthonormal basis P of G's dominant subspace:

* ``left``  (P = U[:, :r], m x r):  R = P^T G (r x n),  back: P R
* ``right`` (P = Vh[:r], r x n):    R = G P^T (m x r),  back: R P
* ``full``  (P = (U[:, :r], Vh[:r])): R = U^T G V (r x r), back: U R Vh
* ``std`` chooses ``right`` when m >= n else ``left``, so the low-rank state is max(m, n) x r, never m x n;
  ``reverse_std`` the opposite. These follow galore-torch 1.0, so results can be compared with it.

The basis is recomputed from the current gradient every ``update_proj_gap`` steps (at steps 0, gap, 2 gap, ...
counted before the step's increment, as galore-torch does), by exact SVD or by randomized SVD (Halko, Martinsson
and Tropp 2011: Gaussian range finder with ``oversample`` extra columns and ``power_iters`` power iterations,
re-orthonormalised after each product: on a GPU by shifted Cholesky-QR (its shifted pass alone between the power
iterations, all three passes for the last basis) with the range finder's products in the precision the user chose
(TF32 where allowed, bfloat16 for a 16-bit proj_dtype), on the CPU by Householder QR; the small k x n problem at
the end solved on a GPU by the eigendecomposition of its k x k Gram matrix in float64, on the CPU by its SVD; the
Gaussian test matrix is seeded by (seed, parameter key, step), so resuming from a checkpoint recomputes the same
basis; it is drawn on the gradient's device, so on GPUs its values are those of torch's CUDA generator, which are
the same on GPUs of one model, not across models: torch spreads the stream over a grid sized by the SM count).

A new basis is computed in one place, :meth:`GaLoreProjector.compute` (which calls :func:`compute_basis` with the
seed of the parameter and step): the standalone projector's refresh and every optimizer of the GaLore family (with
its float, INT4 or sharded storage) go through it.

A standalone projector keeps its basis in a plain dict of tensors (``projector.state``: ``"ortho"`` and, for
``full``, ``"ortho_right"``, with ``state_dict()`` / ``load_state_dict()``), stored in ``proj_dtype`` (float32 by
default, as galore-torch does for float32 weights; bfloat16 halves their bytes) by
:class:`weightkit.optim.basis.FloatBasis` and used in float32. Inside an optimizer the basis lives in the
parameter's optimizer state, in the optimizer's storage format (weightkit.optim.basis).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .basis import FloatBasis, resolve_proj_dtype

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")
BASIS_KEYS = FloatBasis.keys


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


def basis_seed(seed: int, key: int, step: int) -> int:
    """Seed of the randomized SVD's test matrix for parameter ``key`` refreshed at ``step`` (process independent)."""
    return ((int(seed) * 1_000_003 + int(key)) * 1_000_003 + int(step)) % (2**62)


ORTHONORMALIZERS = ("auto", "householder", "cholqr")
_FP32_UNIT_ROUNDOFF = 2.0**-24
cholqr_fallbacks = 0  # refreshes whose Cholesky-QR failed and that were redone with Householder QR (diagnostics)
_ORTHONORMAL_TOL = 1e-2  # max |Q^T Q - I| of a Cholesky-QR basis, else Householder (TF32 Grams: ~1e-4 observed)


def _cholesky_qr(y: Tensor, failed: Tensor, shifted: bool = False) -> Tensor:
    """One Cholesky-QR pass: Q = Y L^-T with L L^T = Y^T Y (+ s I when ``shifted``); Gram, Cholesky and solve in
    float32. A failed factorization is recorded in ``failed`` on the device, not raised (no host sync)."""
    y = y.to(torch.float32)
    gram = y.T @ y
    if shifted:
        # Shifted CholeskyQR (Fukaya et al. 2020): Y^T Y + s I is factored, so the pass succeeds despite the Gram's
        # rounding, and its result, with singular values sigma_i / sqrt(sigma_i^2 + s), is conditioned enough for
        # the two unshifted passes that follow when s is small against sigma_1^2. Their worst-case bound,
        # s = 11 (m k + k (k + 1)) u ||Y||^2, is larger than sigma_1^2 once m k u nears 1 (4096 x 1032 in float32:
        # 3.5 sigma_1^2 with the 2-norm), and then the second pass failed (its Gram indefinite) for every
        # cond(Y) >= 1e4 (CPU, float32, and with the Gram's operands rounded to TF32 as tensor cores do), the
        # refresh falling back to Householder QR. s = sqrt(k) u ||Y||_F^2 is above the Gram's rounding (about
        # sqrt(m / k) u ||Y||_F^2 in norm for random errors; rounding Y's entries to TF32 leaves an exact Gram of
        # the rounded Y, still positive semidefinite), and all three passes succeeded up to cond(Y) = 1e5
        # (float32) and 1e6 (TF32 operands) for m x k from 96 x 20 to 11008 x 528; the first pass never failed.
        # A zero Y gets a tiny shift too.
        k = y.shape[1]
        shift = gram.diagonal().sum() * (math.sqrt(k) * _FP32_UNIT_ROUNDOFF)
        gram.diagonal().add_(shift.clamp_min(torch.finfo(torch.float32).tiny))
    chol, info = torch.linalg.cholesky_ex(gram)
    failed.logical_or_(info.ne(0))
    return torch.linalg.solve_triangular(chol.T, y, upper=True, left=False)


def cholesky_qr(y: Tensor, passes: int = 3) -> Tuple[Tensor, Tensor]:
    """(Q, failed): an orthonormal basis Q (float32, m x k) of the columns of a tall ``y`` (m >= k) and a 0-d bool
    tensor on the device, True when a factorization failed (then Q is not to be used: see
    :func:`randomized_svd`). Shifted CholeskyQR3: one shifted Cholesky-QR pass, then Cholesky-QR2 (two unshifted
    passes: the second restores the orthogonality that the first loses to cond^2). Three GEMMs for the Gram
    matrices, three k x k Cholesky factorizations and three triangular solves: tensor-core work and no host sync,
    where Householder QR (geqrf) is a latency-bound panel factorization. Fails for an exactly rank-deficient
    ``y`` (rank < k); one whose rank falls short only by rounding may give an orthonormal Q spanning Y's range and
    rounding directions, or a Q that is not orthonormal, which :func:`randomized_svd` tests for. ``passes=1``: the
    shifted pass alone, a basis of Y's columns conditioned to about sqrt(s) / sigma_min(Y) but not orthonormal:
    what a power iteration's next product needs."""
    failed = torch.zeros((), dtype=torch.bool, device=y.device)
    q = _cholesky_qr(y, failed, shifted=True)
    for _ in range(passes - 1):
        q = _cholesky_qr(q, failed)
    return q, failed


def _householder(y: Tensor) -> Tensor:
    return torch.linalg.qr(y.to(torch.float32))[0]


SMALL_SVDS = ("auto", "svd", "gram")


def resolve_small_svd(small_svd: str, device: torch.device) -> str:
    """'auto': 'gram' on a GPU, 'svd' on the CPU (see :func:`randomized_svd`). On a GPU, torch.linalg.svd of a
    k x n matrix (cuSOLVER's Jacobi gesvdj for sides over 32) costs about as much as the sweeps over its k columns
    of length n, which for 4096^2 at rank 1024 (k = 1032) is the refresh's largest part by that count (the exact
    4096^2 SVD took 1.05 s on an H200 on 2026-11-26, the whole randomized refresh with it 124 ms), where the
    eigendecomposition of the k x k Gram matrix (syevd) is a tridiagonal reduction of a matrix 4x smaller. The CPU
    keeps the SVD, so CPU bases stay those of earlier versions, bit for bit."""
    if small_svd not in SMALL_SVDS:
        raise ValueError(f"small_svd={small_svd!r} is not one of {', '.join(SMALL_SVDS)}")
    if small_svd == "auto":
        return "gram" if device.type == "cuda" else "svd"
    return small_svd


def _small_factorization(q: Tensor, matrix: Tensor, rank: int, small_svd: str) -> Tuple[Tensor, Optional[Tensor]]:
    """(U[:, :rank], Vh[:rank]) of ``matrix`` (A) from an orthonormal basis Q of its range: B = Q^T A (k x n), then
    'svd': the SVD of B; 'gram': the eigendecomposition of B B^T in float64 (its eigenvectors are B's left singular
    vectors, its eigenvalues their squares; in float64 the squaring costs nothing of float32's accuracy), U only
    (Vh is None: Sigma^-1 U^T B would divide by the singular values of a rank-deficient A)."""
    b = q.T @ matrix
    if small_svd == "svd":
        u_small, _, vh = torch.linalg.svd(b, full_matrices=False)
        return q @ u_small[:, :rank], vh[:rank]
    b64 = b.to(torch.float64)
    _, vectors = torch.linalg.eigh(b64 @ b64.T)  # ascending eigenvalues
    return q @ vectors[:, -rank:].flip(-1).to(q.dtype), None


def randomized_svd(matrix: Tensor, rank: int, oversample: int = 8, power_iters: int = 2,
                   generator: Optional[torch.Generator] = None, orthonormalize: str = "householder",
                   range_dtype: Optional[torch.dtype] = None,
                   small_svd: str = "svd") -> Tuple[Tensor, Optional[Tensor]]:
    """Approximate (U[:, :rank], Vh[:rank]) of a float32 ``matrix`` (m x n).

    Range finder Q (m x k, k = rank + oversample) of ``matrix @ Omega`` with ``power_iters`` rounds of
    Q <- orth(A orth(A^T Q)), then the small problem of B = Q^T A (k x n): ``small_svd`` 'svd' (its exact SVD) or
    'gram' (the eigendecomposition of the k x k B B^T in float64; U only, the second result is None).

    ``orthonormalize``: 'householder' (torch.linalg.qr) or 'cholqr' (:func:`cholesky_qr`). With 'cholqr' the
    failure flags of all factorizations are read once, after the small SVD or eigendecomposition, which
    synchronizes with the device for its own error check anyway (torch.linalg.svd and eigh have no non-checking
    variant), so the read adds no stall; when a factorization failed or the last basis is not orthonormal to
    1e-2 (a rank-deficient gradient) the basis is recomputed with Householder QR.
    ``range_dtype``: the dtype of the range finder's products A Omega, A^T Q, A Q (None: float32, TF32 on a GPU
    where the user allows it; bfloat16: 16-bit tensor cores, float32 results). The Gram matrices, the
    factorizations and the small SVD are float32 (the 'gram' eigendecomposition float64)."""
    m, n = matrix.shape
    k = min(rank + oversample, m, n)
    if small_svd not in ("svd", "gram"):
        raise ValueError(f"small_svd={small_svd!r} is not one of 'svd', 'gram'")
    # drawn on the generator's device (the CPU one by default, so a seed gives the same basis on every device;
    # a CUDA generator draws on the GPU), then moved to the matrix
    gen_device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(n, k, generator=generator, dtype=matrix.dtype, device=gen_device).to(matrix.device)
    if orthonormalize == "householder" and range_dtype in (None, torch.float32) and small_svd == "svd":
        # the original sequence of operations (kept bit for bit: checkpoints resume identically on the CPU)
        q, _ = torch.linalg.qr(matrix @ omega)
        for _ in range(power_iters):
            q, _ = torch.linalg.qr(matrix.T @ q)
            q, _ = torch.linalg.qr(matrix @ q)
        return _small_factorization(q, matrix, rank, "svd")
    if orthonormalize not in ("householder", "cholqr"):
        raise ValueError(f"orthonormalize={orthonormalize!r} is not one of 'householder', 'cholqr'")
    low = matrix if range_dtype in (None, torch.float32) else matrix.to(range_dtype)
    from ..ops.galore import mm_float32

    failed = torch.zeros((), dtype=torch.bool, device=matrix.device)

    def orth(y: Tensor, last: bool) -> Tensor:
        if orthonormalize == "householder":
            return _householder(y)
        # between products one shifted pass: the next product needs the columns well-conditioned, not orthonormal
        # (scikit-learn's randomized range finder uses an LU factorization there); the last basis gets all three
        q, bad = cholesky_qr(y, 3 if last else 1)
        failed.logical_or_(bad)
        return q.masked_fill_(failed, 0.0)  # a failed factorization's NaNs must not reach the SVD (it would raise)

    q = orth(mm_float32(low, omega.to(low.dtype), low.is_cuda), power_iters == 0)
    for i in range(power_iters):
        q = orth(mm_float32(low.T, q.to(low.dtype), low.is_cuda), False)
        q = orth(mm_float32(low, q.to(low.dtype), low.is_cuda), i == power_iters - 1)
    if orthonormalize == "cholqr":
        # the result checked on the device (one more k x k Gram, no sync): a factorization that succeeded on a
        # block whose rank is below k in exact arithmetic can leave columns that are not orthonormal
        err = (q.T @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device)).abs().amax()
        failed.logical_or_(~(err <= _ORTHONORMAL_TOL))  # NaN included
        q = q.masked_fill(failed, 0.0)  # NaN/Inf from a factorization that reported no failure: not to the solver
    u, vh = _small_factorization(q, matrix, rank, small_svd)
    if orthonormalize == "cholqr" and bool(failed):  # read after the small problem's own sync (see above)
        global cholqr_fallbacks
        cholqr_fallbacks += 1
        return randomized_svd(matrix, rank, oversample, power_iters, None if generator is None else
                              generator.manual_seed(generator.initial_seed()), "householder", range_dtype,
                              small_svd)
    return u, vh


def resolve_orthonormalize(orthonormalize: str, device: torch.device) -> str:
    """'auto': Cholesky-QR ('cholqr', :func:`cholesky_qr`) on a GPU (no panel factorization, no stall),
    Householder QR on the CPU (LAPACK's geqrf is fast there, and CPU bases stay those of earlier versions, bit for
    bit)."""
    if orthonormalize not in ORTHONORMALIZERS:
        raise ValueError(f"orthonormalize={orthonormalize!r} is not one of {', '.join(ORTHONORMALIZERS)}")
    if orthonormalize == "auto":
        return "cholqr" if device.type == "cuda" else "householder"
    return orthonormalize


def compute_basis(grad: Tensor, rank: int, side: str, svd: str = "exact", *, oversample: int = 8,
                  power_iters: int = 2, seed: int = 0, orthonormalize: str = "auto",
                  range_dtype: Optional[torch.dtype] = None,
                  small_svd: str = "auto") -> Tuple[Tensor, Optional[Tensor]]:
    """The projection basis for ``grad``: (P, None) for left/right, (U, Vh) for full. Float32, contiguous.
    Randomized: ``orthonormalize`` ('auto' | 'householder' | 'cholqr', :func:`resolve_orthonormalize`),
    ``range_dtype`` (:func:`randomized_svd`) and ``small_svd`` ('auto' | 'svd' | 'gram', :func:`resolve_small_svd`;
    'gram' finds a right basis as the left one of G^T, and 'full' takes 'svd')."""
    matrix = grad.detach().to(torch.float32)
    if svd == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, vh = u[:, :rank], vh[:rank]
    elif svd == "randomized":
        # the test matrix drawn where the gradient is: on a GPU by a CUDA generator (one kernel; the CPU's
        # generator took ~20 ms of host time for 4096 x 1032 values, and a copy, every refresh), on the CPU as before
        gen = torch.Generator(device=matrix.device if matrix.is_cuda else "cpu").manual_seed(int(seed))
        small = resolve_small_svd(small_svd, matrix.device)
        orth = resolve_orthonormalize(orthonormalize, matrix.device)
        if small == "gram" and side == "right":
            u, _ = randomized_svd(matrix.T, rank, oversample, power_iters, gen, orth, range_dtype, small)
            return u.T.contiguous(), None
        u, vh = randomized_svd(matrix, rank, oversample, power_iters, gen, orth, range_dtype,
                               "svd" if side == "full" else small)
    else:
        raise ValueError(f"svd={svd!r} is not one of {', '.join(SVD_METHODS)}")
    if side == "left":
        return u.contiguous(), None
    if side == "right":
        return vh.contiguous(), None
    return u.contiguous(), vh.contiguous()


def project(grad: Tensor, side: str, ortho: Tensor, ortho_right: Optional[Tensor] = None) -> Tensor:
    """Low-rank gradient R (float32) of ``grad`` for a basis from :func:`compute_basis` (float32, or 16-bit used as
    stored: weightkit.optim.basis.FloatBasis.project)."""
    return FloatBasis.project(grad, side, (ortho, ortho_right))


def projection_basis_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a stored basis is used in by the GaLore step: a bfloat16 / float16 basis (proj_dtype) as it is on
    a GPU, where the projections then run on 16-bit tensor cores with float32 accumulation (the precision the user
    chose with proj_dtype); float32 everywhere else (on the CPU 16-bit matmuls gain nothing, and the CPU results
    stay those of earlier versions)."""
    if stored in (torch.bfloat16, torch.float16) and device.type == "cuda":
        return stored
    return torch.float32


def project_back(low: Tensor, side: str, ortho: Tensor, ortho_right: Optional[Tensor] = None) -> Tensor:
    """Full-size update from a low-rank one (the inverse map of :func:`project` on the subspace), unscaled."""
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


def subspace_overlap(a: Tensor, b: Tensor, side: str) -> float:
    """||A^T B||_F^2 / r for two orthonormal rank-r bases: 1.0 when they span the same subspace, in any order."""
    if side == "left":
        return float((a.T @ b).norm() ** 2 / a.shape[1])
    return float((a @ b.T).norm() ** 2 / a.shape[0])


def _follow(state: Dict, device: torch.device) -> None:
    """Move a stored basis to ``device`` (once): one loaded from a checkpoint with map_location='cpu' follows the
    gradients it projects."""
    for k in BASIS_KEYS:
        if k in state and state[k].device != device:
            state[k] = state[k].to(device)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class GaLoreProjector:
    """Projection settings for one parameter (group), with the maths above bound to them.

    Standalone::

        proj = GaLoreProjector(rank=128, update_proj_gap=200, scale=0.25)
        low = proj.project(grad, step)           # refreshes the basis at steps 0, 200, 400, ...
        update = proj.project_back(low_update)   # full size, multiplied by ``scale``
        saved = proj.state_dict(); proj.load_state_dict(saved)

    Inside an optimizer, pass the parameter's state dict (``state=``) so the basis is saved with the optimizer,
    and a ``key`` that tells parameters apart in the randomized SVD's seed.

    Args:
        rank: r, at most min(m, n) of the gradients it will see.
        update_proj_gap: refresh the basis every this many steps (T).
        scale: multiplies the projected-back update (galore-torch's ``scale``, often 0.25).
        proj_type: 'std' | 'reverse_std' | 'left' | 'right' | 'full' (see the module docstring).
        svd: 'exact' (torch.linalg.svd) or 'randomized'.
        oversample, power_iters, seed: randomized SVD settings.
        proj_dtype: storage dtype of the basis (None = float32, 'bfloat16', 'float16'); used in float32.
    """

    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 svd: str = "exact", oversample: int = 8, power_iters: int = 2, seed: int = 0,
                 proj_dtype: Union[None, str, torch.dtype] = None):
        _check_int("rank", rank, 1)
        _check_int("update_proj_gap", update_proj_gap, 1)
        _check_int("oversample", oversample, 0)
        _check_int("power_iters", power_iters, 0)
        _check_int("seed", seed, 0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={proj_type!r} is not one of {', '.join(PROJ_TYPES)}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd={svd!r} is not one of {', '.join(SVD_METHODS)}")
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, float(scale), proj_type
        self.svd, self.oversample, self.power_iters, self.seed = svd, oversample, power_iters, seed
        self.proj_dtype = resolve_proj_dtype(proj_dtype)
        self.storage = FloatBasis(self.proj_dtype)
        self.state: Dict[str, Tensor] = {}
        self._shape: Optional[Tuple[int, int]] = None

    # -- checks -----------------------------------------------------------------------------------------------
    def check_shape(self, shape, name: str = "parameter") -> None:
        if len(shape) != 2:
            raise ValueError(f"GaLore projects 2-D {name}s, got shape {tuple(shape)}")
        if self.rank > min(shape):
            raise ValueError(f"rank={self.rank} is larger than min(m, n)={min(shape)} of {name} with shape "
                             f"{tuple(shape)}")

    def side(self, shape) -> str:
        return projection_side(tuple(shape), self.proj_type)

    # -- storage (a standalone projector's; an optimizer keeps the basis in its own format) ---------------------
    def store_basis(self, state: Dict, ortho: Tensor, ortho_right: Optional[Tensor]) -> None:
        """Keep a freshly computed float32 basis in ``state``, in ``proj_dtype``."""
        self.storage.store(state, ortho, ortho_right, {})

    def load_basis(self, state: Dict) -> Tuple[Tensor, Optional[Tensor]]:
        """The stored basis as float32 tensors (no copy when stored in float32)."""
        return self.storage.load(state, {})

    def has_basis(self, state: Dict) -> bool:
        return self.storage.has(state)

    # -- refresh and projection ---------------------------------------------------------------------------------
    def due(self, step: int, state: Optional[Dict] = None) -> bool:
        state = self.state if state is None else state
        return not self.has_basis(state) or step % self.update_proj_gap == 0

    def compute(self, grad: Tensor, step: int, key: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
        """A new float32 basis for the whole gradient ``grad`` of parameter ``key`` at ``step``: the one place where
        the GaLore family computes bases (the randomized SVD's seed depends on (seed, key, step) only, so every
        process and every resumed run computes the same one)."""
        return compute_basis(grad, self.rank, self.side(grad.shape), self.svd, oversample=self.oversample,
                             power_iters=self.power_iters, seed=basis_seed(self.seed, key, step),
                             range_dtype=projection_basis_dtype(self.proj_dtype, grad.device))

    def refresh(self, grad: Tensor, step: int, state: Optional[Dict] = None, key: int = 0) -> None:
        state = self.state if state is None else state
        self.store_basis(state, *self.compute(grad, step, key))

    def basis(self, grad: Tensor, step: int, state: Optional[Dict] = None, key: int = 0):
        """The float32 basis to use at ``step`` for ``grad`` (refreshed from ``grad`` first when due)."""
        state = self.state if state is None else state
        self.check_shape(grad.shape, "gradient")
        if self.due(step, state):
            self.refresh(grad, step, state, key)
        _follow(state, grad.device)
        return self.load_basis(state)

    def project(self, grad: Tensor, step: int, state: Optional[Dict] = None, key: int = 0) -> Tensor:
        """R, the float32 low-rank gradient of ``grad`` at optimizer step ``step`` (counted from 0)."""
        ortho, ortho_right = self.basis(grad, step, state, key)
        self._shape = tuple(grad.shape)
        return project(grad, self.side(grad.shape), ortho, ortho_right)

    def project_back(self, low: Tensor, state: Optional[Dict] = None, shape=None) -> Tensor:
        """``scale`` times the full-size matrix of a low-rank one (same side as the last :meth:`project`)."""
        state = self.state if state is None else state
        shape = self._shape if shape is None else tuple(shape)
        if shape is None or not self.has_basis(state):
            raise RuntimeError("project_back() needs a basis: call project() first (or pass state and shape)")
        _follow(state, low.device)
        ortho, ortho_right = self.load_basis(state)
        return project_back(low.to(torch.float32), self.side(shape), ortho, ortho_right) * self.scale

    # -- checkpoints (standalone use; inside an optimizer the optimizer's state_dict holds the bases) ----------
    def state_dict(self) -> Dict:
        out = {k: v for k, v in self.state.items()}
        if self._shape is not None:
            out["shape"] = torch.tensor(self._shape, dtype=torch.int64, device="cpu")
        return out

    def load_state_dict(self, state_dict: Dict) -> None:
        unknown = sorted(set(state_dict) - set(self.state_dict_keys()))
        if unknown:
            raise ValueError(f"unknown projector state key(s) {unknown}")
        state = {k: v for k, v in state_dict.items() if k != "shape"}
        if "shape" in state_dict:
            shape = tuple(int(s) for s in state_dict["shape"].tolist())
            self.check_shape(shape, "saved gradient")
            if "ortho" in state:
                side = self.side(shape)
                m, n = shape
                want = {"left": (m, self.rank), "right": (self.rank, n), "full": (m, self.rank)}[side]
                if tuple(state["ortho"].shape) != want:
                    raise ValueError(f"saved ortho has shape {tuple(state['ortho'].shape)}, expected {want} for a "
                                     f"{side} projection of rank {self.rank} of a {shape} gradient")
            self._shape = shape
        self.state = state

    def state_dict_keys(self):
        return BASIS_KEYS + ("shape",)

    def __repr__(self) -> str:
        return (f"GaLoreProjector(rank={self.rank}, update_proj_gap={self.update_proj_gap}, scale={self.scale}, "
                f"proj_type={self.proj_type!r}, svd={self.svd!r}, proj_dtype={self.proj_dtype})")
