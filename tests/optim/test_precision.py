"""The precision the user chose (issue #25 item 2), at the optimizer: with ``proj_dtype='bfloat16'`` a GPU runs the
projections on the stored bf16 basis (16-bit operands, fp32 accumulation) and the refresh's range finder in bf16;
the CPU keeps float32 (and its results bit for bit). The GPU policy is switched on here on the CPU
(projection_basis_dtype patched) so the 16-bit path of the step is exercised without a GPU; float32 products follow
torch's TF32 flag (cuBLAS) and the Triton kernel gets it as its input precision (tests/ops/test_galore_ops.py)."""

import pytest
import torch

from tests.conftest import usable_backends
from weightkit import use_backend
from weightkit.ops import galore as galore_ops
from weightkit.optim import GaLoreAdamW, galore as galore_mod, projector


def model_and_groups(seed=0, **extra):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 24))
    groups = [{"params": [model[0].weight, model[2].weight], "rank": 8, "update_proj_gap": 2, "scale": 0.25,
               "proj_dtype": "bfloat16", **extra},
              {"params": [model[0].bias, model[2].bias]}]
    return model, groups


def train(model, opt, steps=5, round_bf16=False):
    for step in range(steps):
        g = torch.Generator().manual_seed(10 + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
            if p.dim() == 2:  # a gradient's spectrum decays (a flat one has no well-defined top-r subspace)
                k = min(p.shape)
                decay = torch.logspace(0, -3, k)
                p.grad = (torch.randn(p.shape[0], k, generator=g) * decay) @ torch.randn(k, p.shape[1], generator=g)
                if round_bf16:
                    p.grad = p.grad.to(torch.bfloat16).to(torch.float32)
        opt.step()


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_gpu_policy_runs_the_stored_bf16_basis_and_stays_close_to_float32_use(svd, proj_type, monkeypatch):
    seen = []
    real_op = galore_ops._galore_adam_update_op

    def spy(*args):
        seen.append(args[4].dtype)  # ortho as the fused op receives it
        return real_op(*args)

    monkeypatch.setattr(galore_ops, "_galore_adam_update_op", spy)
    for backend in usable_backends(galore_ops._GALORE, "cpu"):
        with use_backend(backend):
            ref_model, groups = model_and_groups(svd=svd, proj_type=proj_type)
            # CPU policy (the bf16 basis used as float32) on the gradients rounded to bf16 as the 16-bit path does:
            # the same products, summed in float32 in another order
            train(ref_model, GaLoreAdamW(groups, lr=1e-2), round_bf16=True)
            assert proj_type == "full" or set(seen) == {torch.float32}
            seen.clear()
            with monkeypatch.context() as patch:
                gpu_policy = lambda stored, device: stored  # noqa: E731 - the GPU's rule, on the CPU
                patch.setattr(galore_mod, "projection_basis_dtype", gpu_policy)
                patch.setattr(projector, "projection_basis_dtype", gpu_policy)
                model, groups = model_and_groups(svd=svd, proj_type=proj_type)
                train(model, GaLoreAdamW(groups, lr=1e-2))
            assert proj_type == "full" or set(seen) == {torch.bfloat16}
            seen.clear()
            initial, _ = model_and_groups()
            for a, b, a0 in zip(model.parameters(), ref_model.parameters(), initial.parameters()):
                # what remains: U rounded to bf16 for the projection back (one-sided) and summation orders, which
                # Adam's elementwise normalization amplifies in entries of R that are ~0 (R = U^T G V of 'full' is
                # diagonal up to rounding: its off-diagonal entries are rounding noise scaled to unit steps)
                ref_moved = (b - a0).norm()
                bound = 0.1 if proj_type == "std" else 1.0
                assert torch.isfinite(a).all() and (a - b).norm() <= bound * ref_moved, (backend, (a - b).norm(),
                                                                                        ref_moved)
                assert a.dim() == 1 or not torch.equal(a, b)
