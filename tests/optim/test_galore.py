"""GaLoreAdamW: same updates as galore-torch, resume bit-identical, 8-bit and layer-wise modes, bad input, on every
device (CPU and, when present, CUDA). galore-torch and bitsandbytes are needed only by the tests that use them."""

import copy
import warnings

import pytest
import torch

from tests.conftest import CUDASIM, DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import galore as galore_ops
from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore
from weightkit.optim.projector import compute_basis, projection_side, subspace_similarity


def params(shape, seed=0, device="cpu"):
    """A weight and a bias drawn on the CPU (the same values on every device for a seed), then moved."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
    return [torch.nn.Parameter(w.to(device)), torch.nn.Parameter(b.to(device))]


def groups(ps, **galore):
    return [{"params": [ps[0]], **galore}, {"params": [ps[1]]}]


def set_grads(ps, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def needs_bnb(cls):
    """GaLoreAdamW8bit quantizes moments with bitsandbytes (those of at least min_8bit_size elements)."""
    if cls is GaLoreAdamW8bit:
        pytest.importorskip("bitsandbytes")


def step_together(steps, *runs):
    """Each step: the step's gradients (set_grads) on every run's parameters, then each run's optimizer steps."""
    for step in steps:
        for ps, _ in runs:
            set_grads(ps, step)
        for _, opt in runs:
            opt.step()


def on_cpu(sd):
    """An optimizer state_dict as ``torch.load(..., map_location='cpu')`` of a checkpoint gives it back (copies)."""
    return {"state": {i: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": copy.deepcopy(sd["param_groups"])}


def close(device, rtol, atol):
    """CPU tolerances as they always were; a GPU sums in other orders: a few times looser."""
    return dict(rtol=rtol, atol=atol) if device == "cpu" else dict(rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("device", DEVICES)
# native: the compiled kernel of the device; cuda on CPU tensors in the run on simulated CUDA (tests/test_cudasim.py)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"] + (["cuda"] if CUDASIM else []))
@pytest.mark.parametrize("shape,proj_type", [((64, 48), "std"), ((40, 72), "std"), ((64, 48), "left"),
                                             ((40, 72), "right"), ((64, 48), "reverse_std"), ((32, 48), "full")])
def test_matches_galore_torch(backend, shape, proj_type, device):
    galore_torch = pytest.importorskip("galore_torch")
    backend = device if backend == "native" else backend
    if backend not in usable_backends(galore_ops._GALORE, device):
        if device == "cpu" and not torch.cuda.is_available() and not CUDASIM:  # the CPU test environment runs all three
            pytest.fail(f"backend {backend} must be usable on CPU in the test environment")
        pytest.skip(f"backend {backend} cannot run on {device} here (triton runs CPU tensors only interpreted)")
    if backend == "triton" and proj_type != "std" and device == "cpu":
        pytest.skip("interpreter is slow; one projection type is enough for the triton path")
    cfg = dict(rank=8, update_proj_gap=5, scale=0.25, proj_type=proj_type)
    a, b = params(shape, device=device), params(shape, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW(groups(a, **cfg), lr=1e-2, weight_decay=0.1)
    ours = GaLoreAdamW(groups(b, **cfg), lr=1e-2, weight_decay=0.1)
    with use_backend(backend):
        step_together(range(12), (a, ref), (b, ours))  # refreshes at steps 0, 5, 10
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), **close(device, rtol=1e-4, atol=5e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_projector_refresh_schedule(device):
    (w, bias) = params((32, 24), device=device)
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 3}], lr=1e-3)
    seen = []
    for step in range(7):
        set_grads([w], step)
        opt.step()
        seen.append(opt.state[w]["ortho"].clone())
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # refreshed before steps 3 and 6
    assert all(t.device == w.device for t in opt.state[w].values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_finds_the_subspace(device):
    g = torch.Generator().manual_seed(0)
    low = torch.randn(256, 16, generator=g) @ torch.randn(16, 192, generator=g)
    noisy = (low + 1e-3 * torch.randn(256, 192, generator=g)).to(device)
    for side in ("left", "right"):
        exact, _ = compute_basis(noisy, 16, side, "exact")
        approx, _ = compute_basis(noisy, 16, side, "randomized", seed=3)
        # same subspace: projecting the exact basis onto the approximate one keeps its norm
        if side == "left":
            kept = (approx.T @ exact).norm() ** 2 / 16
        else:
            kept = (approx @ exact.T).norm() ** 2 / 16
        assert float(kept) > 0.999
        assert subspace_similarity(exact, exact, side) == pytest.approx(1.0, abs=1e-5 if device == "cpu" else 1e-3)  # cuSOLVER bases: ~1e-4 from orthonormal (H200)


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_optimizer_is_deterministic_and_tracks_exact(device):
    torch.manual_seed(0)
    target = torch.randn(48, 32).to(device)
    final = {}
    for svd in ("randomized", "randomized", "exact"):
        w = torch.nn.Parameter(torch.zeros(48, 32, device=device))
        opt = GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 5, "svd": svd, "scale": 1.0}], lr=5e-2)
        for _ in range(100):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
        if svd in final:
            assert torch.equal(final[svd], w.detach()), "randomized SVD is not reproducible"
        final[svd] = w.detach().clone()
    err = {k: float((v - target).norm() / target.norm()) for k, v in final.items()}
    assert err["exact"] < 0.8  # started at 1.0
    assert abs(err["randomized"] - err["exact"]) < 0.05, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_resume_is_bit_identical(cls, device):
    """Resumed from a checkpoint read on the CPU (map_location='cpu'): the state goes back to the parameters'
    device with its own dtypes (float32 moments, uint8 codes), shapes stay on the CPU, and the run continues
    bit for bit."""
    needs_bnb(cls)
    kw = {"min_8bit_size": 1} if cls is GaLoreAdamW8bit else {}
    cfg = dict(rank=8, update_proj_gap=4, scale=0.25)
    a = params((64, 64), device=device)
    opt_a = cls(groups(a, **cfg), lr=1e-2, weight_decay=0.01, **kw)
    for step in range(6):
        set_grads(a, step)
        opt_a.step()
    saved_params = [p.detach().clone() for p in a]
    saved_state = on_cpu(opt_a.state_dict())  # copies, as a checkpoint would (state_dict() shares tensors)
    b = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt_b = cls(groups(b, **cfg), lr=1e-2, weight_decay=0.01, **kw)
    opt_b.load_state_dict(saved_state)
    for p_a, p_b in zip(a, b):
        for k, v in opt_a.state[p_a].items():
            got = opt_b.state[p_b][k]
            if isinstance(v, torch.Tensor):
                assert got.dtype == v.dtype and got.device == v.device and torch.equal(got, v), k
            else:
                assert got == v and type(got) is type(v), k
    if cls is GaLoreAdamW8bit:
        assert opt_b.state[b[0]]["moment_shape"].device.type == "cpu"  # read every step: no sync
    step_together(range(6, 11), (a, opt_a), (b, opt_b))  # crosses a projector refresh (step 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_weights_keep_float32_state_through_a_checkpoint(device):
    """torch's Optimizer.load_state_dict casts floating state to the parameter's dtype; GaLore's moments and bases
    must stay float32 for a bfloat16 weight (the update kernel takes float32 moments)."""
    cfg = dict(rank=8, update_proj_gap=3, scale=0.25)
    a = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params((48, 32), device=device)]
    opt_a = GaLoreAdamW(groups(a, **cfg), lr=1e-2)
    for step in range(2):
        set_grads(a, step)
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = GaLoreAdamW(groups(b, **cfg), lr=1e-2)
    opt_b.load_state_dict(on_cpu(opt_a.state_dict()))
    for k in ("exp_avg", "exp_avg_sq", "ortho"):
        assert opt_b.state[b[0]][k].dtype == torch.float32 and opt_b.state[b[0]][k].device == b[0].device, k
    step_together(range(2, 5), (a, opt_a), (b, opt_b))  # crosses the refresh at step 3
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_tracks_fp32_and_uses_less_state(device):
    pytest.importorskip("bitsandbytes")
    cfg = dict(rank=16, update_proj_gap=50, scale=0.25)
    a, b = params((128, 128), device=device), params((128, 128), device=device)
    fp32 = GaLoreAdamW(groups(a, **cfg), lr=1e-3)
    q8 = GaLoreAdamW8bit(groups(b, **cfg), lr=1e-3, min_8bit_size=1)
    step_together(range(20), (a, fp32), (b, q8))
    moved_fp32 = (a[0] - params((128, 128), device=device)[0]).detach()
    moved_q8 = (b[0] - params((128, 128), device=device)[0]).detach()
    rel = float((moved_q8 - moved_fp32).norm() / moved_fp32.norm())
    assert rel < 0.05, rel

    def state_bytes(opt, p):
        return sum(t.numel() * t.element_size() for t in opt.state[p].values() if isinstance(t, torch.Tensor))

    assert state_bytes(q8, b[0]) < 0.6 * state_bytes(fp32, a[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_8bit_moments_update_in_one_pass_and_the_write_back_is_fused(device, dtype, proj_type, monkeypatch):
    """GaLoreAdamW8bit's low-rank moments go through blockwise8bit_adam_ once per step (no bitsandbytes dequantize /
    quantize of them), a one-sided projection's direction is written back by lowrank_update_ (never
    galore_adam_update_), and the run tracks the three-pass path (dequantize, update, quantize: the same format and
    maths, another rounding of a few codes) closely; both read the other's state."""
    pytest.importorskip("bitsandbytes")
    from weightkit.optim import moments, weights

    calls = {"blockwise8bit_adam_": 0, "lowrank_update_": 0, "galore_adam_update_": 0}

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(moments, "blockwise8bit_adam_")
    counted(weights, "lowrank_update_")
    counted(weights, "galore_adam_update_")
    cfg = dict(rank=8, update_proj_gap=4, scale=0.25, proj_type=proj_type)

    def run(one_pass, steps=range(9), ps=None, state=None):
        # small weights: bf16's rounding of them stays below the steps' updates
        ps = ps or [torch.nn.Parameter((p.detach() * 1e-2).to(dtype)) for p in params((48, 64), device=device)]
        opt = GaLoreAdamW8bit(groups(ps, **cfg), lr=1e-2, weight_decay=0.01, min_8bit_size=1)
        if state is not None:
            opt.load_state_dict(state)
        if not one_pass:
            opt.parts.moments.adam_direction_ = lambda state, low, u: None  # the three passes through float32
        step_together(steps, (ps, opt))
        return ps, opt

    one, opt = run(True)
    one_sided = proj_type != "full"
    assert calls == {"blockwise8bit_adam_": 9, "lowrank_update_": 9 if one_sided else 0, "galore_adam_update_": 0}
    calls.update(dict.fromkeys(calls, 0))
    three, _ = run(False)
    assert calls["blockwise8bit_adam_"] == 0 and calls["lowrank_update_"] == 0
    assert calls["galore_adam_update_"] == (9 if one_sided else 0)
    start = (params((48, 64), device=device)[0] * 1e-2).to(dtype).float()
    moved_one, moved_three = one[0].float() - start, three[0].float() - start
    rel = float((moved_one - moved_three).norm() / moved_three.norm())
    print(f"{proj_type} {dtype}: one pass vs three passes, relative difference of the update {rel:.4f}")
    assert rel < 0.1, rel  # measured 0.010-0.058 (the full projection's r x r moments: one block, few codes)
    # each path resumes from the other's checkpoint and keeps training (one format)
    resumed, _ = run(False, range(9, 12), [torch.nn.Parameter(p.detach().clone()) for p in one], opt.state_dict())
    assert all(torch.isfinite(p).all() for p in resumed) and not torch.equal(resumed[0], one[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_layerwise_matches_global_step(accumulation_steps, device):
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 16)).to(device)
    model_b = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 16)).to(device)
    model_b.load_state_dict(model_a.state_dict())
    cfg = dict(rank=8, update_proj_gap=3, scale=0.5)

    def split(model):
        ws = [model[0].weight, model[2].weight]
        rest = [model[0].bias, model[2].bias]
        return [{"params": ws, **cfg}, {"params": rest}]

    opt = GaLoreAdamW(split(model_a), lr=1e-2)
    layerwise = LayerwiseGaLore(split(model_b), accumulation_steps=accumulation_steps, lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        for micro in range(accumulation_steps):
            x = torch.randn(8, 32, generator=g).to(device)
            model_a(x).pow(2).mean().backward()
            model_b(x).pow(2).mean().backward()
            if micro < accumulation_steps - 1:
                assert layerwise.pending()
                with pytest.raises(RuntimeError, match="middle of an accumulation window"):
                    layerwise.zero_grad()
        opt.step()
        opt.zero_grad()
        layerwise.zero_grad()
        assert all(p.grad is None for p in model_b.parameters())  # freed inside backward
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, **close(device, rtol=1e-5, atol=1e-6))
    with pytest.raises(RuntimeError, match="do not call step"):
        layerwise.step()
    state = layerwise.state_dict()
    layerwise.load_state_dict(state)
    with pytest.raises(ValueError, match="accumulation_steps must be an int"):
        LayerwiseGaLore(split(model_b), accumulation_steps=0)
    layerwise.remove()


@pytest.mark.parametrize("device", DEVICES)
def test_rank_larger_than_matrix(device):
    w = torch.nn.Parameter(torch.randn(16, 8, device=device))
    with pytest.raises(ValueError, match=r"rank=9 is larger than min\(m, n\)=8"):
        GaLoreAdamW([{"params": [w], "rank": 9}])


@pytest.mark.parametrize("device", DEVICES)
def test_unknown_group_key_and_bad_options(device):
    w = torch.nn.Parameter(torch.randn(16, 8, device=device))
    with pytest.raises(ValueError, match=r"unknown param group key\(s\) \['ranks'\]"):
        GaLoreAdamW([{"params": [w], "ranks": 4}])
    with pytest.raises(ValueError, match="proj_type='diagonal'"):
        GaLoreAdamW([{"params": [w], "rank": 4, "proj_type": "diagonal"}])
    with pytest.raises(ValueError, match="svd='qr'"):
        GaLoreAdamW([{"params": [w], "rank": 4, "svd": "qr"}])
    with pytest.raises(ValueError, match="update_proj_gap must be an int >= 1"):
        GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 0}])
    with pytest.raises(ValueError, match="nonfinite must be"):
        GaLoreAdamW([w], nonfinite="ignore")


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("inf"), "lr must be a finite number >= 0, got inf"),
    ("lr", -1e-3, "lr must be a finite number >= 0"),
    ("betas", (0.9, 1.0), r"betas must be a pair of numbers in \[0, 1\), got \(0.9, 1.0\)"),
    ("betas", (0.9,), r"betas must be a pair of numbers in \[0, 1\)"),
    ("eps", float("nan"), "eps must be a finite number >= 0, got nan"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number >= 0, got nan"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
])
def test_adam_settings_are_checked_in_the_defaults_and_in_each_group(key, value, match):
    """AdamW's settings as torch.optim.AdamW checks them, NaN and inf refused too, in the defaults and in a group's
    own values (they were checked in the defaults alone, and weight_decay nowhere); a group refused by
    add_param_group leaves the optimizer as it was."""
    w, v = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [w], "rank": 4}], **{key: value})
    with pytest.raises(ValueError, match="param group 1: " + match):
        GaLoreAdamW([{"params": [w], "rank": 4}, {"params": [v], key: value}])
    opt = GaLoreAdamW([{"params": [w], "rank": 4}])
    with pytest.raises(ValueError, match="param group 1: " + match):
        opt.add_param_group({"params": [v], key: value})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [w]
    opt.add_param_group({"params": [v]})
    assert len(opt.param_groups) == 2


def test_a_float64_weight_in_a_low_rank_group_is_refused_before_any_step():
    """The fused low-rank update writes float32 / bf16 / fp16 weights: a float64 one was accepted, then the first
    step raised with its state already made. A float64 parameter without a rank (AdamW) still steps."""
    lin = torch.nn.Linear(16, 8).double()
    with pytest.raises(ValueError, match=r"a float64 parameter of shape \(8, 16\) in a low-rank group"):
        GaLoreAdamW([{"params": [lin.weight], "rank": 4}])
    opt = GaLoreAdamW([{"params": [lin.weight, lin.bias]}], lr=1e-2)
    lin(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, lin.weight)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_gradient_raises_without_changing_state(device):
    ps = params((32, 16), device=device)
    opt = GaLoreAdamW(groups(ps, rank=4), lr=1e-2)
    set_grads(ps, 0)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state_before = {k: v.clone() for k, v in opt.state[ps[0]].items() if isinstance(v, torch.Tensor)}
    set_grads(ps, 1)
    ps[1].grad[3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert all(torch.equal(v, opt.state[ps[0]][k]) for k, v in state_before.items())
    assert opt.state[ps[0]]["step"] == 1
    skip = GaLoreAdamW(groups(ps, rank=4), lr=1e-2, nonfinite="skip")
    skip.step()
    assert skip.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_gradient_is_rejected(device):
    emb = torch.nn.Embedding(10, 4, sparse=True, device=device)
    opt = GaLoreAdamW([{"params": emb.parameters()}])
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_projection_side_rule():
    assert projection_side((10, 5), "std") == "right" and projection_side((5, 10), "std") == "left"
    assert projection_side((10, 5), "reverse_std") == "left"
    with pytest.raises(ValueError, match="proj_type='x'"):
        projection_side((4, 4), "x")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_bad_value_anywhere_in_a_projected_gradient_is_caught(value, refresh, proj_type, device):
    """The check runs on R = P^T G (or G P^T): a NaN/Inf at any position of G must still be found, on steps that
    refresh the basis (checked on G before the SVD) and on steps that do not."""
    gen = torch.Generator().manual_seed(7)
    for trial in range(6):
        ps = params((24, 40), seed=trial, device=device)
        opt = GaLoreAdamW(groups(ps, rank=5, update_proj_gap=2 if refresh else 100, proj_type=proj_type), lr=1e-2)
        set_grads(ps, 0)
        opt.step()
        set_grads(ps, 1)
        opt.step()  # step 2 refreshes when update_proj_gap=2
        before = [p.detach().clone() for p in ps]
        state = copy.deepcopy(opt.state_dict())
        set_grads(ps, 2)
        i, j = (int(torch.randint(n, (1,), generator=gen)) for n in ps[0].shape)
        ps[0].grad[i, j] = value
        with pytest.raises(FloatingPointError, match=r"1 parameter\(s\) of shapes \[\(24, 40\)\]"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, ps))
        after = opt.state_dict()["state"][0]
        for k, v in state["state"][0].items():
            assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k


@pytest.mark.parametrize("device", DEVICES)
def test_finite_flags_fast_path_and_overflow(device):
    from weightkit.ops._checks import finite_flags

    big = torch.full((1000,), 3e38, device=device)  # finite values whose sum overflows: confirmed element-wise
    nan = torch.randn(50, device=device)
    nan[17] = float("nan")
    assert finite_flags([torch.randn(8, 8, device=device), big, torch.empty(0, device=device)]) == [True, True, True]
    assert finite_flags([torch.randn(8, device=device), nan, big.to(torch.float16)]) == [True, False, False]  # fp16 inf
    assert finite_flags([]) == []


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_projector_storage_meets_the_state_budget_and_tracks_float32(device):
    """proj_dtype='bfloat16' stores the basis in half the bytes: at rank d/4 the state is 31.25% of AdamW's."""
    d = 128
    cfg = dict(rank=d // 4, update_proj_gap=5, scale=0.25)
    a, b = params((d, d), device=device), params((d, d), device=device)
    fp32 = GaLoreAdamW(groups(a, **cfg), lr=1e-3)
    bf16 = GaLoreAdamW(groups(b, **cfg, proj_dtype="bfloat16"), lr=1e-3)
    step_together(range(12), (a, fp32), (b, bf16))
    assert bf16.state[b[0]]["ortho"].dtype == torch.bfloat16
    state = sum(t.numel() * t.element_size() for t in bf16.state[b[0]].values() if isinstance(t, torch.Tensor))
    assert state / (2 * d * d * 4) <= 0.35
    moved = (a[0] - params((d, d), device=device)[0]).detach()
    rel = float(((b[0] - a[0]).detach()).norm() / moved.norm())
    assert rel < 0.02, rel
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = GaLoreAdamW(groups(resumed, **cfg, proj_dtype="bfloat16"), lr=1e-3)
    opt_c.load_state_dict(on_cpu(bf16.state_dict()))
    assert opt_c.state[resumed[0]]["ortho"].dtype == torch.bfloat16  # not cast to the float32 weight's dtype
    assert opt_c.state[resumed[0]]["ortho"].device == resumed[0].device
    step_together(range(12, 16), (b, bf16), (resumed, opt_c))
    assert all(torch.equal(x, y) for x, y in zip(b, resumed))
    with pytest.raises(ValueError, match="proj_dtype="):
        GaLoreAdamW(groups(params((8, 8), device=device), rank=2, proj_dtype="int8"))


def _trained(cls, device="cpu", **kw):
    ps = params((32, 24), device=device)
    opt = cls(groups(ps, rank=4, update_proj_gap=3), lr=1e-2, **kw)
    for step in range(4):
        set_grads(ps, step)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("corrupt,match", [
    (lambda sd: sd["state"][0].pop("ortho"), "no projection basis"),
    (lambda sd: sd["state"][0].update(ortho=torch.zeros(5, 24)), r"saved ortho has shape \(5, 24\)"),
    (lambda sd: sd["param_groups"][0].update(rank=5), "saved ortho has shape|moment_shape"),
    (lambda sd: sd["param_groups"][0].update(rank=40), "saved rank 40 is larger"),
    (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), r"saved exp_avg has shape \(3,\)"),
    (lambda sd: next(v for v in sd["state"][1].values() if isinstance(v, torch.Tensor) and v.is_floating_point()
                     ).fill_(float("nan")), "holds NaN/Inf"),
    (lambda sd: sd["state"][0].update(step=-1), "step must be an int >= 0"),
    (lambda sd: sd["param_groups"].pop(), "param groups"),
    (lambda sd: sd.pop("state"), "must be a dict with 'state'"),
])
def test_mismatched_or_corrupt_checkpoint_raises_and_loads_nothing(cls, corrupt, match, device):
    needs_bnb(cls)
    ps, opt = _trained(cls, device, **({"min_8bit_size": 1} if cls is GaLoreAdamW8bit else {}))
    good = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    corrupt(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for idx, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][idx][k]) if isinstance(v, torch.Tensor) else v == after["state"][idx][k]
    opt.load_state_dict(good)  # the intact checkpoint still loads


@pytest.mark.parametrize("device", DEVICES)
def test_8bit_truncated_quantized_moment_raises(device):
    pytest.importorskip("bitsandbytes")
    ps, opt = _trained(GaLoreAdamW8bit, device, min_8bit_size=1)
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:-1]
    with pytest.raises(ValueError, match="exp_avg_absmax must hold"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_strict_float32_unless_the_user_allows_tf32(backend, device):
    """With ``torch.backends.cuda.matmul.allow_tf32`` off (torch's default) a GaLore step is float32 throughout: the
    update matches a float64 computation to float32 rounding, on every backend; the step leaves the setting as it
    found it. Measured on CPU for these shapes: float32 products 1.8e-7 off (max error / max value), the same maths
    with operands cut to TF32's 10-bit mantissa 1.3e-3; the bound 2e-5 tells them apart. On the CPU (no TF32) the
    check runs too, so the test's own arithmetic is exercised without a GPU."""
    backend = device if backend == "native" else backend
    if backend not in usable_backends(galore_ops._GALORE, device):
        pytest.skip(f"backend {backend} cannot run on {device} here")
    m, n, r = 64, 192, 16  # 'std': left projection, P is m x r
    g = torch.Generator().manual_seed(3)
    grad, ortho = torch.randn(m, n, generator=g), torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    w = torch.nn.Parameter(torch.zeros(m, n, device=device))
    opt = GaLoreAdamW([{"params": [w], "rank": r, "update_proj_gap": 100, "scale": 0.5}], lr=0.1)
    # a state at step 5 with zero first moments and unit second moments: the update is linear in P^T G
    sd = {"state": {0: {"step": 5, "exp_avg": torch.zeros(r, n), "exp_avg_sq": torch.ones(r, n), "ortho": ortho}},
          "param_groups": opt.state_dict()["param_groups"]}
    opt.load_state_dict(sd)
    w.grad = grad.to(device)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with use_backend(backend):
            opt.step()
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    p64, g64 = ortho.double(), grad.double()
    low = p64.T @ g64
    exp_avg, exp_avg_sq = 0.1 * low, 0.999 + 0.001 * low * low
    step_size = 0.1 * (1 - 0.999**6) ** 0.5 / (1 - 0.9**6)
    want = -step_size * 0.5 * (p64 @ (exp_avg / (exp_avg_sq.sqrt() + 1e-6)))
    err = float((w.detach().cpu().double() - want).abs().max() / want.abs().max())
    assert err < 2e-5, err
