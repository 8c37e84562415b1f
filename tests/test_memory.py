"""weightkit.memory: the peak-memory breakdown of a training step, on a small LLaMA on the CPU; the model's
memory-lean RMSNorm and SwiGLU."""

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.memory import (PARTS, activation_bytes, format_breakdown, gradient_bytes, peak_breakdown,
                              saved_tensor_bytes, tensor_bytes)
from weightkit.models.llama import TinyLlama, _RMSNorm, _SiluMul, preset, rms_norm_reference, silu_mul_reference


def _model(checkpointing):
    torch.manual_seed(0)
    model = TinyLlama(preset("tiny", max_seq_len=32, dim=64, n_layers=3))
    model.gradient_checkpointing = checkpointing
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32), generator=gen), torch.randint(0, 256, (2, 32), generator=gen)


def test_activations_match_autograd_and_checkpointing_keeps_less():
    x, y = _batch()
    full = activation_bytes(_model(False), x, y)
    ckpt = activation_bytes(_model(True), x, y)
    # without checkpointing: at least the logits (B x T x vocab float32) and every block's input are saved
    assert full > 2 * 32 * 256 * 4 + 3 * 2 * 32 * 64 * 4
    assert 0 < ckpt < full
    # a deeper model: the checkpointed activations grow by one block input per block, the full ones by a block
    deep = TinyLlama(preset("tiny", max_seq_len=32, dim=64, n_layers=6))
    deep.gradient_checkpointing = True
    assert activation_bytes(deep, x, y) - ckpt == 3 * 2 * 32 * 64 * 4


def test_breakdown_adds_up_to_the_peak():
    model = _model(True)
    opt = torch.optim.AdamW(model.parameters())
    x, y = _batch()
    model(x, y).backward()
    opt.step()
    acts = activation_bytes(model, x, y)
    peak = 50 * 2**20
    parts = peak_breakdown(peak, model, opt.state, False, acts)
    assert set(parts) == set(PARTS) | {"peak"}
    assert sum(parts[p] for p in PARTS) == peak
    params = sum(p.numel() * 4 for p in model.parameters())
    assert parts["weights"] == params and parts["gradients"] == params
    assert parts["optimizer_state"] == tensor_bytes(opt.state) >= 2 * params
    assert gradient_bytes(model, layerwise=True) == max(p.numel() * 4 for p in model.parameters())
    text = format_breakdown(parts, "peak RSS")
    assert "activations" in text and "measured peak" in text and "50.0 MiB" in text


# -- the model's memory-lean norm and SwiGLU: autograd's results, bit for bit, for fewer saved bytes -----------------
def _rand(*shape, seed, dtype, device, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_rms_norm_and_silu_mul_give_autograd_bits_and_save_less(device, dtype, wdtype):
    """_RMSNorm and _SiluMul (TinyLlama's norm and SwiGLU) recompute in backward what autograd saves: the outputs
    and both gradients are those of the plain ops (rms_norm_reference, silu_mul_reference) bit for bit, on
    non-contiguous inputs too, and they save fewer bytes (the norm: x and 1/rms; SwiGLU: gate and up)."""
    x = _rand(6, 9, 64, seed=1, dtype=dtype, device=device).transpose(0, 1).requires_grad_()  # non-contiguous
    w = (_rand(64, seed=2, dtype=torch.float64, device=device).abs() + 0.5).to(wdtype).requires_grad_()
    dy = _rand(9, 6, 64, seed=3, dtype=torch.promote_types(dtype, wdtype), device=device)
    want = rms_norm_reference(x, w, 1e-5)
    got = _RMSNorm.apply(x, w, 1e-5)
    assert got.dtype == want.dtype and torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    lean = saved_tensor_bytes(lambda: _RMSNorm.apply(x, w, 1e-5), exclude=[w])
    full = saved_tensor_bytes(lambda: rms_norm_reference(x, w, 1e-5), exclude=[w])
    assert lean <= x.numel() * x.element_size() + 9 * 6 * 4 < full

    gate = _rand(9, 5, 96, seed=4, dtype=dtype, device=device, scale=3.0).requires_grad_()
    up = _rand(9, 96, 5, seed=5, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    dy = _rand(9, 5, 96, seed=6, dtype=dtype, device=device)
    want, got = silu_mul_reference(gate, up), _SiluMul.apply(gate, up)
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(got, (gate, up), dy), torch.autograd.grad(want, (gate, up), dy)):
        assert torch.equal(a, b)
    lean = saved_tensor_bytes(lambda: _SiluMul.apply(gate, up))
    assert lean == 2 * gate.numel() * gate.element_size() < saved_tensor_bytes(lambda: silu_mul_reference(gate, up))


def test_rms_norm_and_silu_mul_gradcheck():
    x = _rand(3, 4, 8, seed=7, dtype=torch.float64, device="cpu").requires_grad_()
    w = (_rand(8, seed=8, dtype=torch.float64, device="cpu").abs() + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w))  # (computes in float64)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x, w))
    gate, up = (_rand(3, 8, seed=s, dtype=torch.float64, device="cpu").requires_grad_() for s in (9, 10))
    assert torch.autograd.gradcheck(_SiluMul.apply, (gate, up))


def test_model_uses_the_lean_functions_only_when_grad_is_needed():
    model = _model(False)
    x, y = _batch()
    with torch.no_grad():
        a = model(x, y)
    b = model(x, y)
    assert torch.equal(a, b.detach()) and b.grad_fn is not None
    names = set()
    stack, seen = [b.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "_RMSNormBackward" in names and "_SiluMulBackward" in names, names


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes of storages made by ops inside the mode that were alive at once (views and in-place results,
    whose storage is an input's, count once)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in inputs and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_backward_keeps_few_temporaries(dtype):
    """The lean norm's backward has at most three full-size float32 tensors alive at once, besides its result; the
    plain ops' backward (autograd) has more: the peak of a checkpointed 7B block's backward was there."""
    x = _rand(8, 32, 256, seed=11, dtype=dtype, device="cpu").requires_grad_()
    w = (_rand(256, seed=12, dtype=dtype, device="cpu").abs() + 0.5).requires_grad_()
    dy = _rand(8, 32, 256, seed=13, dtype=dtype, device="cpu")
    full32 = x.numel() * 4
    peaks = {}
    for name, fn in (("lean", lambda: _RMSNorm.apply(x, w, 1e-5)), ("plain", lambda: rms_norm_reference(x, w, 1e-5))):
        y = fn()
        with LiveBytes() as probe:
            grads = torch.autograd.grad(y, (x, w), dy)
        del grads
        peaks[name] = probe.peak
    assert peaks["lean"] <= 3 * full32 + x.numel() * x.element_size() + 64 * 1024, peaks
    assert peaks["plain"] > peaks["lean"], peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_backward_keeps_two_temporaries(dtype):
    """The lean SwiGLU's backward has at most two tensors of the MLP's width of its own alive at once (d_gate, and
    silu(gate) turned into d_up in place), besides the incoming gradient: with three, it was the peak of a
    checkpointed 7B block's backward once the projection's float32 copy went (86 MiB each at 16 x 256 tokens)."""
    gate = _rand(8, 32, 256, seed=14, dtype=dtype, device="cpu").requires_grad_()
    up = _rand(8, 32, 256, seed=15, dtype=dtype, device="cpu").requires_grad_()
    dy = _rand(8, 32, 256, seed=16, dtype=dtype, device="cpu")
    full = gate.numel() * gate.element_size()
    y = _SiluMul.apply(gate, up)
    with LiveBytes() as probe:
        grads = torch.autograd.grad(y, (gate, up), dy)
    del grads
    assert probe.peak <= 2 * full + 64 * 1024, (probe.peak, full)
