"""QGaLoreAdamW8bit: trains to within 5% of fp32 GaLore, INT4 projectors, lazy refresh, SR weight updates, errors."""

import copy

import pytest
import torch
from torch import nn

from weightkit import swap, train
from weightkit.nn import Int8Linear
from weightkit.optim import GaLoreAdamW, QGaLoreAdamW8bit, param_groups

CFG = dict(steps=80, batch_size=8, seq_len=64, lr=3e-3, rank=16, update_proj_gap=20, dim=64, n_layers=2, n_heads=4,
           eval_every=20)


def test_trains_within_5_percent_of_fp32_galore():
    cfg = train.TrainConfig(**CFG)
    fp32 = train.run("galore", cfg, progress=False)
    q = train.run("qgalore", cfg, progress=False)
    assert q.val_loss <= 1.05 * fp32.val_loss, (q.val_loss, fp32.val_loss)
    assert q.weight_bytes < 0.5 * fp32.weight_bytes  # int8 block weights


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    swap(model, "int8", filter_fn=lambda n, m: True, group_size=32)
    return model


def fit_step(model, opt, x, y):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss)


def test_int8_weights_update_and_stay_int8():
    model = mlp()
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=10, scale=1.0), lr=1e-2, min_8bit_size=1)
    x, y = torch.randn(32, 64), torch.randn(32, 32)
    w0 = model[0].weight.clone()
    losses = [fit_step(model, opt, x, y) for _ in range(30)]
    assert model[0].weight.dtype == torch.int8 and not torch.equal(w0, model[0].weight)
    assert losses[-1] < 0.8 * losses[0]
    assert getattr(model[0].weight, "float_grad", None) is None  # consumed by the step
    st = opt.state[model[0].weight]
    assert st["ortho_q"].dtype == torch.uint8 and "ortho" not in st  # projector kept in INT4
    assert st["exp_avg_q"].dtype == torch.uint8  # 8-bit moments


def test_lazy_refresh_counts():
    """A gradient whose dominant subspace never changes: similarities stay near 1, the interval doubles."""
    w = nn.Parameter(torch.zeros(64, 32))
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 4, generator=g))[0]
    v = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 4, "update_proj_gap": 2, "queue_size": 2, "cos_threshold": 0.9}],
                           lr=1e-3)
    for step in range(40):
        w.grad = u @ torch.diag(torch.tensor([10.0, 5, 3, 2])) @ v.T + 1e-3 * torch.randn(64, 32, generator=g)
        opt.step()
    count = opt.refresh_counts()[0]
    assert count < 40 // 2  # fewer SVDs than the fixed interval would run
    assert opt.state[w]["gap"] > 2


def test_resume_is_bit_identical():
    model = mlp()
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
    x, y = torch.randn(16, 64), torch.randn(16, 32)
    for _ in range(4):
        fit_step(model, opt, x, y)
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = QGaLoreAdamW8bit(param_groups(model2, rank=8, update_proj_gap=3), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(4):
        fit_step(model, opt, x, y)
        fit_step(model2, opt2, x, y)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_groups():
    model = mlp()
    with pytest.raises(ValueError, match="must be in a param group with a 'rank'"):
        QGaLoreAdamW8bit(model.parameters())
    with pytest.raises(ValueError, match="proj_type='full' is not supported"):
        QGaLoreAdamW8bit(param_groups(model, rank=8, proj_type="full"))
    with pytest.raises(ValueError, match=r"rank=100 is larger than min\(m, n\)"):
        QGaLoreAdamW8bit(param_groups(model, rank=100))
    loose = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="must belong to a weightkit.nn.Int8Linear"):
        QGaLoreAdamW8bit([{"params": [loose], "rank": 2}])


def test_corrupt_int4_projector_in_checkpoint_raises():
    model = mlp()
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
    x, y = torch.randn(16, 64), torch.randn(16, 32)
    for _ in range(2):
        fit_step(model, opt, x, y)
    sd = copy.deepcopy(opt.state_dict())
    idx = next(i for i, st in sd["state"].items() if "ortho_q" in st)
    bad = copy.deepcopy(sd)
    bad["state"][idx]["ortho_q"] = bad["state"][idx]["ortho_q"][:-2]
    with pytest.raises(ValueError, match="ortho_q must hold"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][idx]["ortho_shape"] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="saved ortho_shape"):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)
