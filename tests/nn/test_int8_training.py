"""Int8Linear trains with torch's own machinery and no weightkit-specific hook (issue #27): its weight's gradient
is an ordinary .grad, so clip_grad_norm_, GradScaler, DDP's all-reduce (gloo, 2 ranks), FSDP2's fully_shard (gloo),
register_post_accumulate_grad_hook (layer-wise Q-GaLore), torch optimizers (stochastic rounding of their in-place
updates) and torch.compile of a whole training step work on it. CPU; the CUDA GradScaler variant runs where a GPU
is present."""

import copy
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from weightkit.nn import Int8Linear
from weightkit.nn.int8 import Int8Weight, int8_assign_sr_

WORLD = 2


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Int8Linear.from_linear(nn.Linear(32, 64), group_size=16), nn.Tanh(),
                         Int8Linear.from_linear(nn.Linear(64, 8), group_size=32))


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g), torch.randn(n, 8, generator=g)


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def int8_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, Int8Linear)]


# -- the gradient ------------------------------------------------------------------------------------------------------
def test_grad_is_made_accumulated_and_freed_by_autograd():
    model = make_model()
    x, y = data()
    mse(model, x, y).backward()
    first = [w.grad.clone() for w in int8_weights(model)]
    assert all(type(g) is torch.Tensor and g.dtype == torch.float32 for g in first)
    mse(model, x, y).backward()
    for w, g in zip(int8_weights(model), first):
        torch.testing.assert_close(w.grad, 2 * g)
    torch.optim.SGD(model.parameters(), lr=0.0).zero_grad(set_to_none=True)
    assert all(w.grad is None for w in int8_weights(model))


def test_autocast_computes_in_the_activation_dtype_without_a_hook():
    """Under CPU bf16 autocast the layer casts its input as autocast casts nn.Linear's: the output and the weight
    gradient's GEMM are bf16, the .grad has the weight's dtype (float32, as nn.Linear's under autocast)."""
    model = make_model()
    layer = model[0]
    x, _ = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    want = (g.T @ x.to(torch.bfloat16)).float()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, want, rtol=0, atol=0)


def test_clip_grad_norm_counts_and_clips_int8_gradients():
    model = make_model()
    x, y = data()
    mse(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    int8_part = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.grad) for w in int8_weights(model)]))
    assert int8_part > 0.5 * want  # the int8 weights carry most of the gradient: missing them would show
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(want) / 4)
    torch.testing.assert_close(total, want)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g * (float(want) / 4) / (float(want) + 1e-6))


def _grad_scaler_checks(device):
    model = make_model().to(device)
    x, y = (t.to(device) for t in data())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    reference = copy.deepcopy(model)
    with torch.autocast(device, dtype=torch.float16):
        ref_loss = mse(reference, x, y)
    ref_loss.backward()
    with torch.autocast(device, dtype=torch.float16):
        loss = mse(model, x, y)
    scaler.scale(loss).backward()
    assert float(model[0].weight.grad.abs().max()) > 100 * float(reference[0].weight.grad.abs().max())  # scaled
    scaler.unscale_(opt)  # the int8 weights' gradients are unscaled with the others
    for w, r in zip(int8_weights(model), int8_weights(reference)):
        torch.testing.assert_close(w.grad, r.grad, rtol=1e-2, atol=1e-4)
    before = [w.dequantize().clone() for w in int8_weights(model)]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(w.dequantize(), b) for w, b in zip(int8_weights(model), before))
    opt.zero_grad()
    # an inf in an int8 weight's gradient: found by the inf check, the step is skipped, the scale backs off
    with torch.autocast(device, dtype=torch.float16):
        loss = mse(model, x, y)
    scaler.scale(loss).backward()
    model[2].weight.grad[0, 0] = float("inf")
    state = [(w.qdata.clone(), w.scale.clone()) for w in int8_weights(model)]
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale_before / 2
    assert all(torch.equal(w.qdata, q) and torch.equal(w.scale, s) for w, (q, s) in zip(int8_weights(model), state))


def test_grad_scaler_with_fp16_autocast_on_cpu():
    _grad_scaler_checks("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grad_scaler_with_fp16_autocast_on_cuda():
    _grad_scaler_checks("cuda")


def test_post_accumulate_grad_hook_and_layerwise_qgalore():
    pytest.importorskip("bitsandbytes")
    from weightkit.optim import LayerwiseGaLore, QGaLoreAdamW8bit, param_groups

    model = make_model()
    seen = []
    handle = model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    x, y = data()
    mse(model, x, y).backward()
    assert len(seen) == 1 and torch.equal(seen[0], model[0].weight.grad)
    model.to("cpu")  # a move that changes nothing (Trainer does it) keeps the weight object and its hooks
    mse(model, x, y).backward()
    assert len(seen) == 2
    handle.remove()
    model.zero_grad()
    opt = LayerwiseGaLore(param_groups(model, rank=4, update_proj_gap=5), optimizer_cls=QGaLoreAdamW8bit, lr=1e-2,
                          proj_group_size=4)
    assert len(opt.params) == len(list(model.parameters()))  # the int8 weights are stepped from the hook too
    before = [w.qdata.clone() for w in int8_weights(model)]
    losses = []
    for _ in range(12):
        loss = mse(model, x, y)
        loss.backward()  # each parameter is updated, and its gradient freed, inside backward
        losses.append(loss.item())
        assert all(p.grad is None for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0]
    assert all(not torch.equal(w.qdata, b) for w, b in zip(int8_weights(model), before))


# -- optimizers --------------------------------------------------------------------------------------------------------
def test_torch_adamw_trains_int8_weights_reproducibly():
    model = make_model()
    twin = copy.deepcopy(model)  # the same values and the same rounding streams
    x, y = data()

    def fit(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = mse(m, x, y)
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        return losses

    losses = fit(model)
    assert losses[-1] < 0.5 * losses[0]
    assert all(isinstance(w, Int8Weight) and w.qdata.dtype == torch.int8 for w in int8_weights(model))
    assert all(int(w.sr_state[1]) > 0 for w in int8_weights(model))  # written back by stochastic rounding
    assert fit(twin) == losses
    assert all(torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
               for a, b in zip(int8_weights(model), int8_weights(twin)))


def test_in_place_updates_round_stochastically_and_without_bias():
    """An update of a quarter quantization step: rounding to nearest would lose it everywhere; stochastic rounding
    keeps it on average (unbiased), and a second update draws new noise."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(256, 64), group_size=64)
    w = layer.weight
    with torch.no_grad():
        old = w.dequantize()
        step = w.scale.repeat_interleave(64).reshape(w.shape)
        delta = 0.25 * step
        w.add_(delta)
        new = w.dequantize()
        moved = (new - old - delta) / step
    assert abs(float(moved.mean())) < 0.02 and float((new != old).float().mean()) > 0.1
    with torch.no_grad():
        q1 = w.qdata.clone()
        w.sub_(delta)
        w.add_(delta)
    assert not torch.equal(w.qdata, q1)  # new noise each update (the counter advanced)
    assert int(w.sr_state[1]) == 3
    with torch.no_grad():  # a positive factor only rescales the groups: the values stay, no rounding noise
        q, s = w.qdata.clone(), w.scale.clone()
        w.mul_(0.5)
    assert torch.equal(w.qdata, q) and torch.equal(w.scale, s * 0.5) and int(w.sr_state[1]) == 3
    with torch.no_grad():  # copy_ of a float tensor sets a value: to nearest, deterministic
        target = torch.randn(w.shape)
        w.copy_(target)
    assert (w.dequantize() - target).abs().max() <= w.scale.max() / 2 + 1e-6


def test_qgalore_keeps_its_fused_low_rank_path():
    pytest.importorskip("bitsandbytes")
    from weightkit.optim import QGaLoreAdamW8bit, param_groups

    model = make_model()
    opt = QGaLoreAdamW8bit(param_groups(model, rank=4, update_proj_gap=5), lr=1e-2, proj_group_size=4)
    x, y = data()
    before = [w.qdata.clone() for w in int8_weights(model)]
    for _ in range(3):
        opt.zero_grad()
        mse(model, x, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    for w, b in zip(int8_weights(model), before):
        assert not torch.equal(w.qdata, b)
        assert int(w.sr_state[1]) == 0  # written by int8_sr_update_ with the optimizer's own seeds, not in-place ops


def test_galore_adamw_trains_int8_weights_or_says_why_not():
    from weightkit.optim import GaLoreAdamW, param_groups

    model = make_model()
    opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=5), lr=1e-2)
    x, y = data()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="must be in a param group with a 'rank'.*torch.optim.AdamW"):
        GaLoreAdamW([{"params": [model[0].weight]}])


def test_assign_sr_op_checks_and_opcheck():
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    scale = torch.rand(8) + 0.5
    state = torch.tensor([5, 0])
    value = torch.randn(8, 32)
    torch.library.opcheck(torch.ops.weightkit.int8_assign_sr_.default, (q, scale, state.clone(), value, 32))
    int8_assign_sr_(q, scale, state, value, 32)
    assert int(state[1]) == 1
    with pytest.raises(ValueError, match="value has shape"):
        int8_assign_sr_(q, scale, state, value[:4], 32)
    with pytest.raises(TypeError, match="sr_state must have dtype"):
        int8_assign_sr_(q, scale, state.int(), value, 32)
    with pytest.raises(ValueError, match="scale must hold one value per group"):
        int8_assign_sr_(q, scale[:4], state, value, 32)


# -- torch.compile of a whole training step -------------------------------------------------------------------------------
def test_compiled_training_step_matches_eager():
    """forward, backward and torch.optim.AdamW's step in one torch.compile'd function: the update is written back
    by the opaque int8_assign_sr_ op, so every compiled call draws new rounding noise from the weight's counter."""
    model = make_model()
    twin = copy.deepcopy(model)
    x, y = data()

    def make_step(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)

        def step():
            loss = mse(m, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        return step

    compiled = torch.compile(make_step(model))
    eager = make_step(twin)  # AdamW's default weight decay: a positive factor, applied to the scales in eager
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [float(compiled()) for _ in range(4)]
    # torch 2.13's AOTAutograd cache asks the subclass for its key (Int8Weight._stable_hash_for_caching)
    assert not [w for w in caught if "_stable_hash_for_caching" in str(w.message)]
    want = [float(eager()) for _ in range(4)]
    # the compiled step rounds AdamW's weight decay too (its factor is a traced tensor there, not a number, so it is
    # not applied to the scales alone as in eager) and draws other noise: the runs agree to the rounding noise
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)
    assert got[-1] < got[0]
    for a, b in zip(int8_weights(model), int8_weights(twin)):
        assert int(a.sr_state[1]) >= 4 and int(b.sr_state[1]) == 4  # the counter advanced at run time, each call
        assert isinstance(a, Int8Weight) and a.qdata.dtype == torch.int8
        step = a.scale.repeat_interleave(a.group_size).reshape(a.shape)
        assert float(((a.dequantize() - b.dequantize()).abs() / step).mean()) < 1.0  # noise of a few SR draws


# -- DDP and FSDP2 (gloo, 2 processes) ------------------------------------------------------------------------------------
def _scenario(rank, mode):
    model = make_model()
    x, y = data()
    per = x.shape[0] // WORLD
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        wrapped = fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = {"losses": []}
    for step in range(4):
        loss = mse(wrapped, xs, ys)
        loss.backward()
        if step == 0:
            out["grads"] = [(w.grad.full_tensor() if hasattr(w.grad, "full_tensor") else w.grad).clone()
                            for w in int8_weights(model)]
            out["local_types"] = [type(w.to_local() if hasattr(w, "to_local") else w).__name__
                                  for w in int8_weights(model)]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        out["losses"].append(loss.item())
    out["weights"] = [(w.full_tensor() if hasattr(w, "full_tensor") else w.dequantize()).detach().clone()
                      for w in int8_weights(model)]
    return out


def _worker(rank, mode, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(_scenario(rank, mode), os.path.join(out_dir, f"{mode}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/optim/test_distributed.py: no C++ static destructors racing a gloo thread


def run_distributed(mode, tmp_path):
    init_file = os.path.join(tempfile.mkdtemp(dir=tmp_path), "store")
    mp.spawn(_worker, args=(mode, init_file, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp_path, f"{mode}.rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def full_batch_grads():
    model = make_model()
    mse(model, *data()).backward()
    return [w.grad for w in int8_weights(model)]


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


@needs_gloo
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_reduce_int8_weight_gradients_themselves(mode, tmp_path):
    """DDP's all-reduce / FSDP2's reduce-scatter average the int8 weights' .grad with the others: equal to the
    full-batch gradient of one process; clipping and AdamW then keep the replicas (DDP) or the gathered weights
    (FSDP2) identical across ranks."""
    r0, r1 = run_distributed(mode, tmp_path)
    for got in (r0["grads"], r1["grads"]):
        for g, want in zip(got, full_batch_grads()):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    if mode == "fsdp2":
        assert r0["local_types"] == ["Int8Weight", "Int8Weight"]  # each rank holds int8 rows and their scales
    for a, b in zip(r0["weights"], r1["weights"]):
        assert torch.equal(a, b)
    assert r0["losses"][-1] < r0["losses"][0] and r1["losses"][-1] < r1["losses"][0]
