"""MemoryLinear and the MemoryFormer blocks: from_linear, gradients, dtypes, and a tiny LM that learns real text, on
every device (CPU and, when present, CUDA)."""

import math

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit.data import batches, byte_corpus
from weightkit.models.llama import unigram_entropy_bits
from weightkit.nn import MemoryFFN, MemoryFormerBlock, MemoryLinear, MemoryQKV


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_approximates_the_linear_layer(device):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(device)
    mem = MemoryLinear.from_linear(lin, tau=8)
    assert mem.tables.device.type == mem.bias.device.type == device
    x = torch.randn(1024, 64).to(device)
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(lin(x).flatten(), mem(x).flatten(), dim=0)
    assert float(cos) > 0.7
    assert mem.table_bytes() == 8 * 256 * 32 * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_dtypes_and_gradients(dtype, device):
    layer = MemoryLinear(48, 20, tau=6, device=device, dtype=dtype)
    assert layer.tables.device.type == device and layer.tables.dtype == dtype
    x = torch.randn(3, 5, 48, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 20) and y.dtype == dtype and y.device.type == device
    y.float().pow(2).sum().backward()
    assert x.grad is not None and layer.tables.grad is not None and layer.bias.grad is not None
    assert layer.tables.grad.abs().sum() > 0 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_shapes(device):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, device=device)
    q, k, v = MemoryQKV(32, tau=8, device=device)(x)
    assert q.shape == k.shape == v.shape == (2, 7, 32)
    assert MemoryFFN(32, 64, tau=8, device=device)(x).shape == (2, 7, 32)
    block = MemoryFormerBlock(32, 4, tau=8, device=device)
    assert {p.device.type for p in block.parameters()} == {device}
    y = block(x)
    assert y.shape == (2, 7, 32) and y.device.type == device
    y.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == device for p in block.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    with pytest.raises(ValueError, match="tau=8 must divide in_features=20"):
        MemoryLinear(20, 4, tau=8, device=device)
    with pytest.raises(ValueError, match="tau must be an int in"):
        MemoryLinear(20, 4, tau=0, device=device)
    with pytest.raises(ValueError, match="temperature"):
        MemoryLinear(16, 4, tau=8, t=-1, device=device)
    with pytest.raises(ValueError, match="n_heads=3 must divide dim=32"):
        MemoryFormerBlock(32, 3, device=device)


class TinyMemoryLM(nn.Module):
    def __init__(self, dim=64, layers=2, tau=8):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(MemoryFormerBlock(dim, 4, 2 * dim, tau) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return nn.functional.cross_entropy(self.head(self.norm(h)).flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_memoryformer_learns_real_text(device):
    torch.manual_seed(0)
    train, val = byte_corpus()
    model = TinyMemoryLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    it = batches(train, 16, 64, torch.Generator().manual_seed(0))
    first = None
    for _ in range(150):
        loss = model(*(t.to(device) for t in next(it)))
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vit = batches(val, 16, 64, torch.Generator().manual_seed(1))
        val_loss = sum(float(model(*(t.to(device) for t in next(vit)))) for _ in range(4)) / 4
    unigram = unigram_entropy_bits(train) * math.log(2)
    assert val_loss < unigram < first, (first, val_loss, unigram)
