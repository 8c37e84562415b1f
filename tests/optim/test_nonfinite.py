"""The GaLore step's NaN/Inf verdict as a device flag (issue #25 item 1).

* ``nonfinite='raise'`` reads the flag on the host once per step; ``'skip'`` reads nothing on a steady step: the
  commit is predicated on the flag. On the CPU there is no device to wait for, so the host reads are counted
  instead of syncs: every value read of a tensor goes through ``aten._local_scalar_dense`` (``.item()``,
  ``bool(t)``, ``int(t)``, ``float(t)``) or ``aten.is_nonzero``, which a TorchDispatchMode sees (tests/test_sync.py
  counts the syncs themselves on a GPU).
* Predicated skip: weights, moments (float32 and 8-bit), bases and Adam's step count stay as they were, on every
  backend of the fused op, for float and int8 weights, one-sided and two-sided projections, and the dense AdamW
  parameters; the next good step then equals the step of an optimizer that never saw the bad gradient.
"""

import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import weightkit
from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import galore as galore_ops
from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore, QGaLoreAdamW8bit, param_groups
from weightkit.optim.galore import found_inf_flags

HOST_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::nonzero", "aten::equal"}


class CountHostReads(TorchDispatchMode):
    """Records the ops that hand a tensor's value to Python (a host sync on a GPU) on non-CPU-only state: shapes
    kept on the CPU on purpose (HOST_KEYS) are read with ``.tolist()``, which dispatches nothing."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def make_model(seed=0, device="cpu", int8=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16)).to(device)
    if int8:
        weightkit.swap(model, "int8", filter_fn=lambda n, m: True, group_size=8)
    return model


def grads(model, step, bad=None):
    """Fixed gradients for ``step``; ``bad`` = (parameter index, value) puts a NaN/Inf in one entry."""
    g = torch.Generator().manual_seed(500 + step)
    for i, p in enumerate(model.parameters()):
        grad = torch.randn(p.shape, generator=g).to(p.device)
        if bad is not None and bad[0] == i:
            grad.view(-1)[grad.numel() // 3] = bad[1]
        p.grad = grad.to(p.dtype)  # Int8Linear weights (Int8Weight) present a float dtype and take an ordinary .grad


def snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    weights += [m.scale.clone() for m in model.modules() if hasattr(m, "scale") and isinstance(m.scale, torch.Tensor)]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in st.items()}
             for p, st in opt.state.items()}
    return weights, state


def assert_unchanged(model, opt, snap, ignore=("step", "nonfinite_skips")):
    weights, state = snap
    now, _ = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(weights, now))
    for p, st in opt.state.items():
        for k, v in st.items():
            if k in ignore:
                continue
            old = state[id(p)][k]
            assert (torch.equal(v, old) if isinstance(v, torch.Tensor) else v == old), k


OPTIMIZERS = {
    "GaLoreAdamW": lambda groups: GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, nonfinite="skip"),
    "GaLoreAdamW-full": lambda groups: GaLoreAdamW([dict(g, proj_type="full") if "rank" in g else g for g in groups],
                                                   lr=1e-2, nonfinite="skip"),
    "GaLoreAdamW-bf16basis": lambda groups: GaLoreAdamW([dict(g, proj_dtype="bfloat16") if "rank" in g else g
                                                         for g in groups], lr=1e-2, nonfinite="skip"),
    "GaLoreAdamW8bit": lambda groups: GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=16, nonfinite="skip"),
    "QGaLoreAdamW8bit": lambda groups: QGaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=16, nonfinite="skip",
                                                        proj_group_size=8),
}


def build(name, device="cpu", seed=0):
    if name in ("GaLoreAdamW8bit", "QGaLoreAdamW8bit"):
        pytest.importorskip("bitsandbytes")
    model = make_model(seed, device, int8=name == "QGaLoreAdamW8bit")
    groups = param_groups(model, rank=4, update_proj_gap=1000, scale=0.25)
    return model, OPTIMIZERS[name](groups)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_flags(device):
    ok = [torch.randn(5, 7, device=device), torch.randn(3, device=device).to(torch.bfloat16),
          torch.full((1000,), 3e38, device=device), torch.empty(0, device=device)]  # a sum would overflow: no flag
    flags = found_inf_flags(ok)
    assert list(flags) == [torch.device(device) if device == "cpu" else ok[0].device]
    assert float(next(iter(flags.values()))) == 0.0
    before = [t.clone() for t in ok]
    assert all(torch.equal(a, b) for a, b in zip(before, ok))  # x * 1 written back: same values
    expanded = torch.ones(1, device=device).expand(6)  # a gradient set by hand: checked through a copy
    assert float(next(iter(found_inf_flags([expanded]).values()))) == 0.0
    assert float(next(iter(found_inf_flags([torch.full((1,), float("nan"), device=device).expand(6)]).values())))
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = torch.randn(64, device=device).to(torch.float16)
        bad[41] = value
        assert float(next(iter(found_inf_flags(ok + [bad]).values()))) != 0.0


@pytest.mark.parametrize("nonfinite,expected", [("raise", 1), ("skip", 0)])
def test_host_reads_per_steady_step(nonfinite, expected):
    model = make_model()
    opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=1000), lr=1e-2, nonfinite=nonfinite)
    for step in range(2):  # step 0 computes the bases (an SVD, a checked gradient: host reads allowed)
        grads(model, step)
        opt.step()
    grads(model, 2)
    with CountHostReads() as mode:
        opt.step()
    assert len(mode.reads) == expected, mode.reads
    grads(model, 3, bad=(0, float("nan")))
    if nonfinite == "skip":  # a bad gradient is skipped without a read too
        with CountHostReads() as mode:
            opt.step()
        assert mode.reads == []
        assert opt.skipped_steps == 1  # reading the count is the read


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [(0, float("nan")), (1, float("inf")), (2, float("-inf"))],
                         ids=["weight-nan", "bias-inf", "weight2-neginf"])
def test_skip_is_predicated_and_resumes_as_if_the_step_never_happened(name, bad):
    """Steps 0-2 good, step 3 bad (skipped on the device flag), steps 4-5 good, against an optimizer that saw the
    same good gradients only: the same weights and moments (a device-side bias correction), on the reference, cpu
    and triton backends of the fused op."""
    backends = usable_backends(galore_ops._GALORE, "cpu")
    for backend in backends:
        with use_backend(backend):
            model, opt = build(name)
            ref_model, ref = build(name)
            for step in range(3):
                grads(model, step)
                opt.step()
                grads(ref_model, step)
                ref.step()
            snap = snapshot(model, opt)
            steps = {p: opt.state[p]["step"] for p in opt.state}
            grads(model, 3, bad=bad)
            with CountHostReads() as mode:
                opt.step()
            assert mode.reads == [], (backend, mode.reads)
            assert_unchanged(model, opt, snap)
            assert all(opt.state[p]["step"] == steps[p] + 1 for p in opt.state)  # the schedule's clock moved on
            assert all(float(opt.state[p]["nonfinite_skips"]) == 1 for p in opt.state)
            assert opt.skipped_steps == 1
            for step in (4, 5):
                grads(model, step)
                opt.step()
                grads(ref_model, step)
                ref.step()
            for a, b in zip(model.parameters(), ref_model.parameters()):
                if a.dtype == torch.int8 or hasattr(a, "qdata"):  # int8 weights (Int8Weight): SR noise is keyed
                    continue                                         # by the step, which the skipped step shifts
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=lambda s: f"{name} {backend}: {s}")
            for p, q in zip(model.parameters(), ref_model.parameters()):
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in opt.state[p] and p.dtype != torch.int8 and not hasattr(p, "qdata"):
                        torch.testing.assert_close(opt.state[p][k], ref.state[q][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW-full", "GaLoreAdamW8bit"])
def test_skip_mode_without_bad_gradients_follows_raise_mode(name):
    model, opt = build(name)
    ref_model, _ = build(name)
    groups = param_groups(ref_model, rank=4, update_proj_gap=2, scale=0.25)  # refreshes: the host path, too
    opt = OPTIMIZERS[name](param_groups(model, rank=4, update_proj_gap=2, scale=0.25))
    ref = OPTIMIZERS[name](groups)
    ref.nonfinite = "raise"
    for step in range(5):
        grads(model, step)
        opt.step()
        grads(ref_model, step)
        ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert opt.skipped_steps == 0


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skip_step_sizes_are_computed_for_all_parameters_at_once(name, monkeypatch):
    """A predicated 'skip' step computes Adam's device step sizes for all its parameters at once
    (GaLoreAdamW._device_step_sizes: per device, group and step count) and counts the skip in every
    ``nonfinite_skips`` with one foreach launch: fewer ops a step than one computation per parameter (the host time
    of a 'skip' step: on this CPU, 24 layers of 7 matrices 64 wide, 25 -> 20 ms a GaLoreAdamW step), and the same
    weights, moments and skip counts bit for bit over good and bad steps."""
    def run(batched):
        if not batched:  # each commit computes its own (the LayerwiseGaLore path)
            monkeypatch.setattr(GaLoreAdamW, "_device_step_sizes", lambda self, *args: None)
        model, opt = build(name)
        ops = []
        for step in range(5):
            grads(model, step, bad=(0, float("nan")) if step == 2 else None)
            with CountOps() as mode:
                opt.step()
            ops.append(mode.count)
        monkeypatch.undo()
        assert opt.skipped_steps == 1
        return snapshot(model, opt), ops

    (weights, state), ops = run(True)
    (weights0, state0), ops0 = run(False)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights0))
    for st, st0 in zip(state.values(), state0.values()):
        assert st.keys() == st0.keys()
        for k, v in st.items():
            assert (torch.equal(v, st0[k]) if isinstance(v, torch.Tensor) else v == st0[k]), (name, k)
    n = sum(1 for st in state.values() if "nonfinite_skips" in st)
    assert n >= 4 and ops[-1] <= ops0[-1] - 6 * (n - 1), (ops, ops0)


def test_skip_on_a_refresh_step_is_decided_on_the_host():
    """A bad gradient due for a refresh is checked before its SVD (host read): the whole step is skipped and the
    step counter does not move, as before device flags."""
    model, opt = build("GaLoreAdamW")
    opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=2), lr=1e-2, nonfinite="skip")
    for step in range(2):
        grads(model, step)
        opt.step()
    snap = snapshot(model, opt)
    grads(model, 2, bad=(0, float("nan")))
    opt.step()  # step 2 refreshes
    assert_unchanged(model, opt, snap, ignore=())
    assert opt.skipped_steps == 1


def test_raise_mode_still_raises_before_anything_changes():
    model, opt = build("GaLoreAdamW")
    opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=1000), lr=1e-2)
    for step in range(2):
        grads(model, step)
        opt.step()
    snap = snapshot(model, opt)
    grads(model, 2, bad=(2, float("nan")))
    with pytest.raises(FloatingPointError, match=r"1 parameter\(s\) of shapes \[\(16, 40\)\]"):
        opt.step()
    assert_unchanged(model, opt, snap, ignore=())


# -- LayerwiseGaLore: the verdict of a whole backward pass, read once -------------------------------------------

LAYERWISE = {"GaLoreAdamW": (GaLoreAdamW, {}), "QGaLoreAdamW8bit": (QGaLoreAdamW8bit, dict(min_8bit_size=16,
                                                                                             proj_group_size=8))}


def build_layerwise(name, nonfinite="raise", defer=True, seed=0, device="cpu"):
    cls, extra = LAYERWISE[name]
    if name == "QGaLoreAdamW8bit":
        pytest.importorskip("bitsandbytes")
    model = make_model(seed, device, int8=name == "QGaLoreAdamW8bit")
    opt = LayerwiseGaLore(param_groups(model, rank=4, update_proj_gap=1000, scale=0.25), optimizer_cls=cls,
                          defer_nonfinite=defer, lr=1e-2, weight_decay=0.1, nonfinite=nonfinite, **extra)
    return model, opt


def backward(model, step, nan_in=None):
    """One forward and backward pass (the layer-wise updates run inside it); ``nan_in``: a parameter whose gradient
    gets a NaN in one entry on its way to .grad."""
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(900 + step)).to(next(model.parameters()).device)
    handle = None
    if nan_in is not None:
        def poison(g):
            g = g.clone()
            g.view(-1)[7] = float("nan")
            return g
        handle = nan_in.register_hook(poison)
    try:
        model(x).pow(2).mean().backward()
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("name", sorted(LAYERWISE))
@pytest.mark.parametrize("nonfinite,defer,expected", [("raise", True, 1), ("raise", False, 4), ("skip", True, 0)],
                         ids=["raise-deferred", "raise-per-parameter", "skip"])
def test_layerwise_host_reads_per_backward(name, nonfinite, defer, expected):
    """Deferred (the default for CUDA parameters; forced here on the CPU): one host read for a whole backward pass
    of 4 parameters, at its end, instead of one per parameter; 'skip': none."""
    model, opt = build_layerwise(name, nonfinite, defer)
    for step in range(2):  # step 0 computes the bases (SVDs, checked gradients: host reads allowed)
        backward(model, step)
    with CountHostReads() as mode:
        backward(model, 2)
    assert len(mode.reads) == expected, mode.reads
    assert all(p.grad is None for p in model.parameters())  # updated and freed inside backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(LAYERWISE))
def test_layerwise_deferred_raise_skips_the_bad_parameter_and_names_it(name, device):
    """A NaN in one gradient: that parameter's update is skipped on the device (weight, scales, moments and step
    count unchanged), the others are updated, and the end of the pass raises naming it (on CUDA by default, forced
    on the CPU). The run then continues as the same optimizer in 'skip' mode (no deferral, each skip counted on the
    device) does."""
    model, opt = build_layerwise(name, defer=None if device == "cuda" else True, device=device)
    ref_model, ref = build_layerwise(name, nonfinite="skip", defer=False, device=device)
    for step in range(3):
        backward(model, step)
        backward(ref_model, step)
    bad = list(model.parameters())[2]  # the second layer's weight, 16 x 40
    others = [p for p in model.parameters() if p is not bad]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in opt.optimizers[2].state[bad].items()}
    with pytest.raises(FloatingPointError, match=r"1 parameter\(s\) of shapes \[\(16, 40\)\]"):
        backward(model, 3, nan_in=bad)
    backward(ref_model, 3, nan_in=list(ref_model.parameters())[2])  # skipped without a word
    assert torch.equal(bad.detach(), before[id(bad)])
    for k, v in opt.optimizers[2].state[bad].items():
        assert (torch.equal(v, state_before[k]) if isinstance(v, torch.Tensor) else v == state_before[k]), k
    assert all(not torch.equal(p.detach(), before[id(p)]) for p in others)
    assert all(p.grad is None for p in model.parameters())
    assert ref.skipped_updates == 1

    def assert_like_ref():
        for a, b in zip(model.parameters(), ref_model.parameters()):
            if hasattr(a, "qdata"):  # int8 weights: stochastic rounding of slightly different values may differ
                assert (a.qdata.int() - b.qdata.int()).abs().max() <= 1
            else:
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)

    assert_like_ref()
    for step in (4, 5):
        backward(model, step)
        backward(ref_model, step)
    if name == "GaLoreAdamW":  # (Q-GaLore: the skipped weight's SR stream is keyed by its step count, which 'skip'
        assert_like_ref()     # mode advances and the deferred raise puts back: its later roundings differ)
    assert [o.state[p]["step"] for o, p in zip(opt.optimizers, opt.params)] == [5 if p is bad else 6
                                                                                for p in opt.params]


def test_predicated_dense_update_by_blocks_is_the_whole_update(monkeypatch):
    """The predicated AdamW of dense parameters runs by blocks of at most 4M values (bounded temporaries): with
    blocks of 7 values (several per tensor, a partial last one) the result is the whole-tensor update, bit for bit,
    and a flagged step still leaves everything unchanged."""
    from weightkit.optim import moments as moments_module

    original = moments_module.blocks_of
    blocks = []

    def run(block):
        if block is not None:
            def small_blocks(*tensors, size):
                for parts in original(*tensors, size=size):
                    blocks.append(parts[0].numel())
                    yield parts
            monkeypatch.setattr(moments_module, "blocks_of", small_blocks)
            monkeypatch.setattr(moments_module, "DENSE_BLOCK", block)
        model = make_model(3)
        opt = GaLoreAdamW(param_groups(model, rank=4, update_proj_gap=1000), lr=1e-2, weight_decay=0.1,
                          nonfinite="skip")
        for step in range(3):
            grads(model, step)
            opt.step()
        snap = snapshot(model, opt)
        grads(model, 3, bad=(1, float("nan")))  # the first bias: a dense parameter
        opt.step()
        assert_unchanged(model, opt, snap)
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()]

    want = run(None)
    got = run(7)
    assert 7 in blocks and 5 in blocks  # the 40- and 16-value biases: blocks of 7 and a partial last one
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# -- 'raise' reading the verdict late (after the step's updates are queued, predicated on the flag): CUDA's default,
#    forced here on the CPU ---------------------------------------------------------------------------------

@pytest.fixture
def late_read(monkeypatch):
    monkeypatch.setattr(GaLoreAdamW, "_LATE_READ_DEVICES", ("cpu", "cuda"))


def early_read_step(opt):
    """A step that reads the flag before committing (the CPU's default, which the late_read fixture changes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GaLoreAdamW, "_LATE_READ_DEVICES", ())
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [(0, float("nan")), (1, float("inf"))], ids=["weight-nan", "bias-inf"])
def test_late_read_raise_changes_nothing_and_reads_once(name, bad, late_read):
    """A steady step reads the flag once, after its updates were queued; a bad gradient then raises, naming the
    parameter, with weights, scales, moments, bases and step counts as they were (the updates were masked on the
    device); the next good steps follow the optimizer that read the flag first."""
    model, opt = build(name)
    ref_model, ref = build(name)
    for o in (opt, ref):
        o.nonfinite = "raise"
    for step in range(3):
        grads(model, step)
        opt.step()
        grads(ref_model, step)
        early_read_step(ref)
    grads(model, 3)
    with CountHostReads() as mode:
        opt.step()
    assert len(mode.reads) == 1, mode.reads
    grads(ref_model, 3)
    early_read_step(ref)
    snap = snapshot(model, opt)
    grads(model, 4, bad=bad)
    shape = tuple(list(model.parameters())[bad[0]].shape)
    with pytest.raises(FloatingPointError, match=rf"1 parameter\(s\) of shapes \[{re.escape(str(shape))}\]"):
        opt.step()
    assert_unchanged(model, opt, snap, ignore=("nonfinite_skips",))  # the step counts too
    for step in (5, 6):
        grads(model, step)
        opt.step()
        grads(ref_model, step)
        early_read_step(ref)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        if hasattr(a, "qdata"):  # int8 weights: stochastic rounding of values equal to rounding may differ
            assert (a.qdata.int() - b.qdata.int()).abs().max() <= 1
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
