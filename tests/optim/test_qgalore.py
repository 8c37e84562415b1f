"""QGaLoreAdamW8bit: trains to within 5% of fp32 GaLore, INT4 projectors, lazy refresh, SR weight updates, errors,
on every device (CPU and, when present, CUDA; the training comparison runs weightkit.train, which is CPU-only)."""

import copy

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit import swap, train
from weightkit.optim import QGaLoreAdamW8bit, param_groups

# every test here builds a QGaLoreAdamW8bit, whose 8-bit moments need bitsandbytes (absent from the GPU image)
pytest.importorskip("bitsandbytes")

CFG = dict(steps=80, batch_size=8, seq_len=64, lr=3e-3, rank=16, update_proj_gap=20, dim=64, n_layers=2, n_heads=4,
           eval_every=20)


def test_trains_within_5_percent_of_fp32_galore():
    cfg = train.TrainConfig(**CFG)
    fp32 = train.run("galore", cfg, progress=False)
    q = train.run("qgalore", cfg, progress=False)
    assert q.val_loss <= 1.05 * fp32.val_loss, (q.val_loss, fp32.val_loss)
    assert q.weight_bytes < 0.5 * fp32.weight_bytes  # int8 block weights


def mlp(device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
    swap(model, "int8", filter_fn=lambda n, m: True, group_size=32)  # quantized where the weights are
    return model


def data(n, device):
    """Inputs and targets drawn on the CPU (the same on every device for a seed), then moved."""
    return torch.randn(n, 64).to(device), torch.randn(n, 32).to(device)


def on_cpu(sd):
    """An optimizer state_dict as ``torch.load(..., map_location='cpu')`` of a checkpoint gives it back (copies)."""
    return {"state": {i: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


def fit_step(model, opt, x, y):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_int8_weights_update_and_stay_int8(device):
    pytest.importorskip("bitsandbytes")  # min_8bit_size=1: the moments are quantized by bitsandbytes
    model = mlp(device)
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=10, scale=1.0), lr=1e-2, min_8bit_size=1)
    x, y = data(32, device)
    w0 = model[0].weight.clone()
    losses = [fit_step(model, opt, x, y) for _ in range(30)]  # refreshes at steps 0, 10, 20
    assert model[0].weight.qdata.dtype == torch.int8 and not torch.equal(w0, model[0].weight)
    assert model[0].weight.device == model[0].scale.device == x.device
    assert losses[-1] < 0.8 * losses[0]
    assert model[0].weight.grad is not None  # an ordinary .grad: freed by zero_grad, not by the step
    st = opt.state[model[0].weight]
    assert st["ortho_q"].dtype == torch.uint8 and "ortho" not in st  # projector kept in INT4
    assert st["exp_avg_q"].dtype == torch.uint8  # 8-bit moments
    assert st["similarities"].device == st["first_vector"].device == x.device  # refreshed three times
    assert st["ortho_shape"].device.type == st["moment_shape"].device.type == "cpu"  # read each step: no sync


@pytest.mark.parametrize("device", DEVICES)
def test_lazy_refresh_counts(device):
    """A gradient whose dominant subspace never changes: similarities stay near 1, the interval doubles."""
    w = nn.Parameter(torch.zeros(64, 32, device=device))
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 4, generator=g))[0]
    v = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]
    signal = u @ torch.diag(torch.tensor([10.0, 5, 3, 2])) @ v.T
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 4, "update_proj_gap": 2, "queue_size": 2, "cos_threshold": 0.9}],
                           lr=1e-3)
    for step in range(40):
        w.grad = (signal + 1e-3 * torch.randn(64, 32, generator=g)).to(device)
        opt.step()
    count = opt.refresh_counts()[0]
    assert count < 40 // 2  # fewer SVDs than the fixed interval would run
    assert opt.state[w]["gap"] > 2
    sims = opt.state[w]["similarities"]
    assert sims.device == w.device and sims.numel() == 2


@pytest.mark.parametrize("device", DEVICES)
def test_older_state_with_cpu_similarities_keeps_training(device):
    """States written before the similarities were made on the gradient's device hold them on the CPU: loaded
    (or left in memory) next to device tensors, the next refreshes still work and move them to the device."""
    w = nn.Parameter(torch.zeros(48, 32, device=device))
    g = torch.Generator().manual_seed(1)
    opt = QGaLoreAdamW8bit([{"params": [w], "rank": 4, "update_proj_gap": 2, "queue_size": 3}], lr=1e-3)

    def steps(n):
        for _ in range(n):
            w.grad = torch.randn(48, 32, generator=g).to(device)
            opt.step()

    steps(3)  # refreshes at steps 0 and 2
    assert opt.state[w]["refresh_count"] == 2
    opt.state[w]["similarities"] = opt.state[w]["similarities"].cpu()  # in memory, as an old run left it
    steps(2)  # the refresh at step 4 concatenates onto it
    assert opt.state[w]["similarities"].device == w.device and opt.state[w]["similarities"].numel() == 2
    old = on_cpu(opt.state_dict())
    old["state"][0]["similarities"] = torch.zeros(0)  # an old checkpoint: empty CPU queue
    opt.load_state_dict(old)
    assert opt.state[w]["similarities"].device == w.device
    steps(4)
    assert opt.state[w]["refresh_count"] == 5 and opt.state[w]["similarities"].device == w.device  # 6 and 8


@pytest.mark.parametrize("device", DEVICES)
def test_resume_is_bit_identical(device):
    """Resumed from a state read on the CPU (map_location='cpu'): INT4 projector, moments, similarities and the
    stochastic rounding stream continue bit for bit, across refreshes."""
    model = mlp(device)
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
    x, y = data(16, device)
    for _ in range(4):
        fit_step(model, opt, x, y)
    model2 = mlp(device)
    model2.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    opt2 = QGaLoreAdamW8bit(param_groups(model2, rank=8, update_proj_gap=3), lr=1e-2)
    opt2.load_state_dict(on_cpu(opt.state_dict()))
    st = opt2.state[model2[0].weight]
    assert st["ortho_q"].device == st["similarities"].device == x.device and st["ortho_shape"].device.type == "cpu"
    for _ in range(4):
        fit_step(model, opt, x, y)
        fit_step(model2, opt2, x, y)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_groups(device):
    model = mlp(device)
    with pytest.raises(ValueError, match="must be in a param group with a 'rank'"):
        QGaLoreAdamW8bit(model.parameters())
    with pytest.raises(ValueError, match="proj_type='full' is not supported"):
        QGaLoreAdamW8bit(param_groups(model, rank=8, proj_type="full"))
    with pytest.raises(ValueError, match=r"rank=100 is larger than min\(m, n\)"):
        QGaLoreAdamW8bit(param_groups(model, rank=100))
    loose = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8, device=device), requires_grad=False)
    with pytest.raises(ValueError, match="must belong to a weightkit.nn.Int8Linear"):
        QGaLoreAdamW8bit([{"params": [loose], "rank": 2}])


@pytest.mark.parametrize("device", DEVICES)
def test_corrupt_int4_projector_in_checkpoint_raises(device):
    model = mlp(device)
    opt = QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=3), lr=1e-2)
    x, y = data(16, device)
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
