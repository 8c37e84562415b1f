"""weightkit.memory: the peak-memory breakdown of a training step, on a small LLaMA on the CPU."""

import torch

from weightkit.memory import PARTS, activation_bytes, format_breakdown, gradient_bytes, peak_breakdown, tensor_bytes
from weightkit.models.llama import TinyLlama, preset


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
