"""No host-device synchronization where there should be none (CUDA only).

A host sync (``.item()``, ``bool(t)``, a copy to or from pageable CPU memory, ``nonzero`` ...) stalls the Python
thread until the GPU has drained its queue, so the next kernels are launched late and the GPU idles. torch's sync
debug mode (``torch.cuda.set_sync_debug_mode``) reports the syncs that go through c10's ``memcpy_and_sync`` /
``stream_synchronize`` ("called a synchronizing CUDA operation"): as an error, or as a warning that can be counted.

* The layers (Int8Linear, MemoryLinear, DictLinear): forward and backward with no sync at all, under "error". The
  ops' data-reading checks are debug checks, off by default (weightkit.ops._checks); these tests run with the
  default settings (no WEIGHTKIT_DEBUG_CHECKS / WEIGHTKIT_CHECK_FINITE in the environment).
* The optimizers (GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit): at most one sync per steady-state step with
  ``nonfinite='raise'`` (the host reads the step's device-side NaN/Inf flag once), none with ``nonfinite='skip'``
  (the commit is predicated on the flag), also on a step whose gradient holds a NaN. Steps that refresh a projector
  run an SVD (which syncs) and are not counted. (The mechanism is tested on the CPU in tests/optim/test_nonfinite.py.)

Modules, inputs and a first (warm-up) call come before the debug mode is switched on: the first call of a kernel
may compile or autotune it, which is allowed to synchronize.
"""

import contextlib
import warnings

import pytest
import torch
from torch import nn

import weightkit
from weightkit.nn import DictLinear, Int8Linear, MemoryLinear
from weightkit.ops import _checks
from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit, param_groups

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync


@pytest.fixture
def default_checks(weightkit_env):
    """weightkit's default settings: debug checks neither forced by the environment nor by a switch."""
    weightkit_env("WEIGHTKIT_DEBUG_CHECKS", None)
    weightkit_env("WEIGHTKIT_CHECK_FINITE", None)
    switch = getattr(_checks, "_DEBUG", None)  # the context's switch (set_debug_checks): back to "not set"
    token = switch.set(None) if switch is not None else None
    try:
        yield
    finally:
        if token is not None:
            switch.reset(token)


@contextlib.contextmanager
def sync_debug_mode(mode):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def count_syncs(fn):
    """Run ``fn`` under the "warn" sync debug mode; return the sync warnings' locations ("file:line")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per location
        with sync_debug_mode("warn"):
            fn()
    return [f"{w.filename}:{w.lineno}" for w in caught if SYNC_MESSAGE in str(w.message)]


LAYERS = {
    "Int8Linear": lambda: Int8Linear.from_linear(nn.Linear(128, 64, device="cuda"), group_size=32),
    "MemoryLinear": lambda: MemoryLinear(128, 64, tau=8, device="cuda"),
    "DictLinear": lambda: DictLinear(128, 64, k=32, s=8, device="cuda"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_forward_backward_has_no_host_sync(name, dtype, default_checks):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(dtype)
    x = torch.randn(4, 16, 128, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(4, 16, 64, device="cuda", dtype=dtype)
    x_inference = torch.randn(2, 128, device="cuda", dtype=dtype)

    def run():
        layer(x).backward(grad_out)
        with torch.no_grad():  # the inference path (no autograd, no custom-op dispatch)
            layer(x_inference)

    run()  # warm-up: kernels compiled / autotuned, backend chosen, cuBLAS initialised
    with sync_debug_mode("error"):  # raises RuntimeError(SYNC_MESSAGE) at the first sync
        run()
    torch.cuda.synchronize()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    if name == "Int8Linear":
        assert layer.weight.grad is not None
    else:
        assert all(p.grad is not None for p in layer.parameters())


# name -> (optimizer class, Int8Linear layers, min_8bit_size or None for the default, needs bitsandbytes)
OPTIMIZERS = {
    "GaLoreAdamW": (GaLoreAdamW, False, None, False),
    "GaLoreAdamW8bit": (GaLoreAdamW8bit, False, 1, True),  # every moment quantized (bitsandbytes)
    # moments < 4096 values stay float32, but the optimizer imports bitsandbytes when it is built
    "QGaLoreAdamW8bit-float-moments": (QGaLoreAdamW8bit, True, None, True),
    "QGaLoreAdamW8bit": (QGaLoreAdamW8bit, True, 1, True),
}


@pytest.mark.parametrize("nonfinite,allowed", [("raise", 1), ("skip", 0)])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_step_syncs_at_most_once(name, nonfinite, allowed, default_checks):
    cls, int8, min_8bit_size, needs_bnb = OPTIMIZERS[name]
    if needs_bnb:
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).cuda()
    if int8:
        weightkit.swap(model, "int8", filter_fn=lambda n, m: True, group_size=32)
    # rank 8 of 64x64 and 32x64 weights (right and left projections); no refresh after step 0
    groups = param_groups(model, rank=8, update_proj_gap=1000, scale=0.25)
    opt = cls(groups, lr=1e-3, nonfinite=nonfinite,
              **({} if min_8bit_size is None else {"min_8bit_size": min_8bit_size}))
    x, y = torch.randn(16, 64, device="cuda"), torch.randn(16, 32, device="cuda")

    def backward():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()

    for _ in range(2):  # step 0 refreshes the projectors (SVD: syncs allowed); step 1 warms the kernels up
        backward()
        opt.step()
    weights = [p for p in groups[0]["params"]]
    refreshes = [opt.state[p].get("refresh_count") for p in weights]
    backward()
    syncs = count_syncs(opt.step)
    assert len(syncs) <= allowed, f"{name}: {len(syncs)} host syncs in one steady-state step, at {syncs}"
    assert all(opt.state[p]["step"] == 3 for p in weights)
    assert [opt.state[p].get("refresh_count") for p in weights] == refreshes  # the counted step did not refresh
    if int8:
        assert all(hasattr(p, "qdata") and p.qdata.dtype == torch.int8 for p in weights)  # Int8Weight, int8 storage
    if nonfinite == "raise":  # the late read (a copy of the flag, waited for by an event) still raises in the step
        backward()
        weights[0].grad.view(-1)[5] = float("nan")
        before = [p.detach().clone() for p in weights]
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, weights))
        assert all(opt.state[p]["step"] == 3 for p in weights)
        backward()
        opt.step()  # the next good step commits
        assert all(opt.state[p]["step"] == 4 for p in weights)
    if nonfinite == "skip":  # a NaN gradient is skipped on the device flag: still no sync, nothing changed
        backward()
        bad = weights[0].grad  # an ordinary .grad for Int8Linear weights too
        bad.view(-1)[5] = float("nan")
        before = [p.detach().clone() for p in weights]
        syncs = count_syncs(opt.step)
        assert not syncs, f"{name}: {len(syncs)} host syncs in a skipped step, at {syncs}"
        assert all(torch.equal(a, b) for a, b in zip(before, weights)) and opt.skipped_steps == 1


@pytest.mark.parametrize("nonfinite,allowed", [("raise", 1), ("skip", 0)])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "QGaLoreAdamW8bit"])
def test_layerwise_backward_syncs_at_most_once(name, nonfinite, allowed, default_checks):
    """LayerwiseGaLore updates each parameter inside backward: with 'raise' the pass's NaN/Inf verdict is read once
    at its end (not once per parameter, which would stall the launch queue 4 times here, 2 x layers in a model);
    with 'skip' never."""
    from weightkit.optim import LayerwiseGaLore

    cls = {"GaLoreAdamW": GaLoreAdamW, "QGaLoreAdamW8bit": QGaLoreAdamW8bit}[name]
    extra = {}
    if cls is QGaLoreAdamW8bit:
        pytest.importorskip("bitsandbytes")
        extra = dict(min_8bit_size=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).cuda()
    if cls is QGaLoreAdamW8bit:
        weightkit.swap(model, "int8", filter_fn=lambda n, m: True, group_size=32)
    opt = LayerwiseGaLore(param_groups(model, rank=8, update_proj_gap=1000, scale=0.25), optimizer_cls=cls, lr=1e-3,
                          nonfinite=nonfinite, **extra)
    x, y = torch.randn(16, 64, device="cuda"), torch.randn(16, 32, device="cuda")

    def backward():
        nn.functional.mse_loss(model(x), y).backward()

    for _ in range(2):  # pass 0 refreshes the projectors (SVD: syncs allowed); pass 1 warms the kernels up
        backward()
    syncs = count_syncs(backward)
    assert len(syncs) <= allowed, f"{name}: {len(syncs)} host syncs in one layer-wise backward pass, at {syncs}"
    assert all(p.grad is None for p in model.parameters())
    assert all(o.state[p]["step"] == 3 for o, p in zip(opt.optimizers, opt.params))
