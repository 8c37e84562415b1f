"""Two GaLore optimizer properties a user relies on without seeing them: the NaN/Inf guard (``nonfinite=``) holds
whatever the debug-check switch says, and every parameter gets its own key (stochastic-rounding seed, staggered
refresh slot), parameters added later with ``add_param_group`` included."""

import pytest
import torch

import weightkit
from weightkit.optim import GaLoreAdamW, QGaLoreAdamW8bit
from weightkit.optim.projector import GaLoreProjector


def galore_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def grads_with_nan(ps, seed):
    g = torch.Generator().manual_seed(seed + 1)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    ps[0].grad[1, 2] = float("nan")


@pytest.mark.parametrize("switch_off", ["set_debug_checks", "debug_checks", "env"])
def test_debug_switch_off_keeps_the_nonfinite_guard(switch_off, weightkit_env):
    """set_debug_checks(False), debug_checks(False) or WEIGHTKIT_DEBUG_CHECKS=0 switch off the ops' data checks;
    the optimizers still raise on (or skip) a NaN gradient and leave the weights unchanged."""
    seed = 3
    ps = galore_params([(16, 24), (16,)], seed)
    before = [p.detach().clone() for p in ps]
    raising = GaLoreAdamW([{"params": ps[:1], "rank": 4}, {"params": ps[1:]}], lr=1e-2)
    skipping = GaLoreAdamW([{"params": ps[:1], "rank": 4}, {"params": ps[1:]}], lr=1e-2, nonfinite="skip")
    grads_with_nan(ps, seed)

    def step_both():
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            raising.step()
        skipping.step()

    if switch_off == "set_debug_checks":
        weightkit.set_debug_checks(False)
        try:
            step_both()
        finally:
            weightkit.set_debug_checks(None)
    elif switch_off == "debug_checks":
        with weightkit.debug_checks(False):
            step_both()
    else:
        weightkit_env("WEIGHTKIT_DEBUG_CHECKS", "0")
        step_both()
    assert skipping.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_qgalore_guard_holds_with_debug_checks_off():
    """The same for Q-GaLore's INT8 weights: a NaN float gradient must not reach the in-place INT8 update."""
    from weightkit.nn import Int8Linear

    torch.manual_seed(5)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 32), group_size=32)
    opt = QGaLoreAdamW8bit([{"params": [layer.weight], "rank": 8}], lr=1e-2, nonfinite="skip")
    layer(torch.randn(4, 64)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    before = layer.weight.detach().clone()
    with weightkit.debug_checks(False):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(layer.weight, before)


def test_parameters_added_later_get_their_own_keys(monkeypatch):
    """Each parameter's key is its position over all groups, for groups given to the constructor and groups added
    with add_param_group alike (they used to all get key 0: one seed, one refresh slot)."""
    seen = {}
    compute = GaLoreProjector.compute

    def recording_compute(self, grad, step, key, *args, **kwargs):
        seen[tuple(grad.shape)] = key
        return compute(self, grad, step, key, *args, **kwargs)

    monkeypatch.setattr(GaLoreProjector, "compute", recording_compute)
    ps = galore_params([(16, 20), (16, 24), (16, 28), (16, 32)], seed=7)
    opt = GaLoreAdamW([{"params": ps[:2], "rank": 4}], lr=1e-2)
    opt.add_param_group({"params": [ps[2]], "rank": 4})
    opt.add_param_group({"params": [ps[3]], "rank": 4})
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen == {(16, 20): 0, (16, 24): 1, (16, 28): 2, (16, 32): 3}


def test_staggered_refreshes_of_added_groups_differ(monkeypatch):
    """With stagger_refresh, parameters added by add_param_group refresh at different steps of a period."""
    refreshed = []
    compute = GaLoreProjector.compute

    def recording_compute(self, grad, step, key, *args, **kwargs):
        refreshed.append((step, tuple(grad.shape)))
        return compute(self, grad, step, key, *args, **kwargs)

    monkeypatch.setattr(GaLoreProjector, "compute", recording_compute)
    ps = galore_params([(16, 20), (16, 24), (16, 28)], seed=11)
    opt = GaLoreAdamW([{"params": ps[:1], "rank": 4, "update_proj_gap": 3}], lr=1e-2, stagger_refresh=True)
    opt.add_param_group({"params": ps[1:], "rank": 4, "update_proj_gap": 3})
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    later = sorted(step for step, _ in refreshed if step > 0)
    assert len(later) == 3 and len(set(later)) == 3, refreshed
