"""MemoryLinear and the MemoryFormer blocks: from_linear, gradients, dtypes, and a tiny LM that learns real text."""

import math

import pytest
import torch
from torch import nn

from weightkit.data import batches, byte_corpus
from weightkit.models.llama import unigram_entropy_bits
from weightkit.nn import MemoryFFN, MemoryFormerBlock, MemoryLinear, MemoryQKV


def test_from_linear_approximates_the_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    mem = MemoryLinear.from_linear(lin, tau=8)
    x = torch.randn(1024, 64)
    cos = nn.functional.cosine_similarity(lin(x).flatten(), mem(x).flatten(), dim=0)
    assert float(cos) > 0.7
    assert mem.table_bytes() == 8 * 256 * 32 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_module_dtypes_and_gradients(dtype):
    layer = MemoryLinear(48, 20, tau=6).to(dtype)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 20) and y.dtype == dtype
    y.float().pow(2).sum().backward()
    assert x.grad is not None and layer.tables.grad is not None and layer.bias.grad is not None
    assert layer.tables.grad.abs().sum() > 0 and torch.isfinite(x.grad.float()).all()


def test_blocks_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    q, k, v = MemoryQKV(32, tau=8)(x)
    assert q.shape == k.shape == v.shape == (2, 7, 32)
    assert MemoryFFN(32, 64, tau=8)(x).shape == (2, 7, 32)
    assert MemoryFormerBlock(32, 4, tau=8)(x).shape == (2, 7, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau=8 must divide in_features=20"):
        MemoryLinear(20, 4, tau=8)
    with pytest.raises(ValueError, match="tau must be an int in"):
        MemoryLinear(20, 4, tau=0)
    with pytest.raises(ValueError, match="temperature"):
        MemoryLinear(16, 4, tau=8, t=-1)
    with pytest.raises(ValueError, match="n_heads=3 must divide dim=32"):
        MemoryFormerBlock(32, 3)


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


def test_tiny_memoryformer_learns_real_text():
    torch.manual_seed(0)
    train, val = byte_corpus()
    model = TinyMemoryLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    it = batches(train, 16, 64, torch.Generator().manual_seed(0))
    first = None
    for _ in range(150):
        loss = model(*next(it))
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vit = batches(val, 16, 64, torch.Generator().manual_seed(1))
        val_loss = sum(float(model(*next(vit))) for _ in range(4)) / 4
    unigram = unigram_entropy_bits(train) * math.log(2)
    assert val_loss < unigram < first, (first, val_loss, unigram)
