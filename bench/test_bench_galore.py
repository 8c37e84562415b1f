"""GaLore step: weightkit GaLoreAdamW (fused) vs torch.optim.AdamW vs galore-torch; projector refresh by exact and
randomized SVD; optimizer-state bytes. Steps are timed after a warm-up step that builds the projector
(update_proj_gap is set past the timed rounds), so they measure the per-step cost; the refresh is timed separately."""

import warnings

import pytest
import torch

from bench.conftest import DEVICE
from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit
from weightkit.optim.projector import compute_basis

CASES = [((1024, 1024), 256), ((2048, 2048), 512), ((4096, 4096), 1024), ((2048, 1024), 128), ((1024, 4096), 256)]
OPTIMIZERS = ["torch.AdamW", "galore-torch", "weightkit.GaLoreAdamW", "weightkit.GaLoreAdamW-bf16proj",
              "weightkit.GaLoreAdamW8bit"]


def state_bytes(opt):
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:  # galore-torch keeps it in an object
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                total += sum(m.numel() * m.element_size() for m in mats)
    return total


def make_optimizer(name, p, rank):
    group = {"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25, "proj_type": "std"}
    if name == "torch.AdamW":
        return torch.optim.AdamW([p], lr=1e-3)
    if name == "galore-torch":
        galore_torch = pytest.importorskip("galore_torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return galore_torch.GaLoreAdamW([group], lr=1e-3)
    if name == "weightkit.GaLoreAdamW":
        return GaLoreAdamW([group], lr=1e-3)
    if name == "weightkit.GaLoreAdamW-bf16proj":
        return GaLoreAdamW([dict(group, proj_dtype="bfloat16")], lr=1e-3)
    return GaLoreAdamW8bit([group], lr=1e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-r{c[1]}")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step(measure, name, case):
    shape, rank = case
    p = torch.nn.Parameter(torch.randn(shape, device=DEVICE) * 0.02)
    p.grad = torch.randn(shape, device=DEVICE)
    opt = make_optimizer(name, p, rank)
    opt.step()  # builds the projector (one SVD) and the state
    big = shape[0] * shape[1] >= 4096 * 4096
    adamw_bytes = 2 * p.numel() * 4
    sb = state_bytes(opt)
    measure(opt.step, rounds=3 if big else 10, op="galore_step", backend=name, shape=[*shape, rank],
            state_bytes=sb, state_vs_adamw=sb / adamw_bytes)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("case", [((1024, 1024), 256), ((4096, 4096), 1024)], ids=lambda c: f"{c[0][0]}x{c[0][1]}-r{c[1]}")
def test_projector_refresh(measure, svd, case):
    shape, rank = case
    grad = torch.randn(shape, device=DEVICE)
    measure(lambda: compute_basis(grad, rank, "left", svd), rounds=1 if shape[0] >= 4096 else 3,
            op="projector_refresh", backend=svd, shape=[*shape, rank])
