"""MemoryFormer layers (arXiv 2411.12992): MemoryLinear and the blocks of the paper's model.

* ``MemoryLinear(in, out, tau=8, t=1.0)``: K = in / tau lookup tables of shape (2^tau, out) replace the weight
  matrix; ``y = sum_k p(z_k) T_k[h(z_k)] + bias`` (weightkit.ops.memoryformer). Tables are trained by any optimizer.
* ``MemoryQKV(dim, tau)``: Q, K and V from three tables that share one hash of the input: one lookup into tables
  of width 3 dim, split in three.
* ``MemoryFFN(dim, hidden, tau)``: two memory layers with a LayerNorm between them (paper Eq. 13).
* ``MemoryFormerBlock(dim, n_heads, tau)``: pre-norm attention on memory Q/K/V (output projection a memory layer
  too) and a MemoryFFN, with residuals — so users can build the paper's model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.memoryformer import memory_lookup
from ._bias import add_bias


def _expected_weight(tau: int, t: float) -> float:
    """E[p] for standard-normal chunks: E[sigmoid(2|z|/t)]^tau (numerical quadrature)."""
    z = torch.linspace(0, 8, 4001, dtype=torch.float64)
    density = torch.exp(-z * z / 2) * math.sqrt(2 / math.pi)
    e = torch.trapezoid(torch.sigmoid(2 * z / t) * density, z)
    return float(e) ** tau


class MemoryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, tau: int = 8, t: float = 1.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.check_options(tau, t)
        if in_features % tau:
            raise ValueError(f"tau={tau} must divide in_features={in_features}")
        self.in_features, self.out_features, self.tau, self.t = in_features, out_features, tau, float(t)
        k = in_features // tau
        std = 1.0 / (math.sqrt(k) * _expected_weight(tau, t))
        self.tables = nn.Parameter(torch.randn(k, 2**tau, out_features, device=device, dtype=dtype) * std * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @staticmethod
    def check_options(tau: int = 8, t: float = 1.0) -> None:
        """Check the options of :meth:`from_linear` that do not depend on a layer's shape (weightkit.swap checks
        them once, before it replaces any layer); raises ValueError naming the option."""
        if isinstance(tau, bool) or not isinstance(tau, int) or not 1 <= tau <= 16:
            raise ValueError(f"tau must be an int in [1, 16], got {tau!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"t (temperature) must be a finite number > 0, got {t!r}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, tau: int = 8, t: float = 1.0) -> "MemoryLinear":
        """Tables initialised from the linear layer: row c of table k is W_k s_c a, where s_c in {-1, +1}^tau is
        bucket c's sign pattern, W_k the weight columns of chunk k, and a = E|z| / E[p] for standard-normal inputs,
        so that y ~ W x on such inputs. The bias is copied."""
        layer = cls(linear.in_features, linear.out_features, tau, t, linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        k = linear.in_features // tau
        codes = torch.arange(2**tau, device=linear.weight.device)
        signs = ((codes[:, None] >> torch.arange(tau, device=codes.device)) & 1).to(torch.float32) * 2 - 1  # (2^tau, tau)
        w = linear.weight.detach().to(torch.float32).reshape(linear.out_features, k, tau)  # (out, K, tau)
        a = math.sqrt(2 / math.pi) / _expected_weight(tau, t)
        with torch.no_grad():
            layer.tables.copy_(torch.einsum("okt,ct->kco", w, signs) * a)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def table_bytes(self) -> int:
        return self.tables.numel() * self.tables.element_size()

    def forward(self, x: Tensor) -> Tensor:
        params = self._parameters  # directly: nn.Module.__getattr__ costs ~0.4 us per parameter
        y = memory_lookup(x, params["tables"] if "tables" in params else self.tables, self.t)
        bias = params["bias"] if "bias" in params else self.bias
        return add_bias(y, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}, t={self.t}"


class MemoryQKV(nn.Module):
    """Q, K, V from three tables sharing one hash (one lookup into width-3*dim tables)."""

    def __init__(self, dim: int, tau: int = 8, t: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.proj = MemoryLinear(dim, 3 * dim, tau, t, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor):
        return self.proj(x).chunk(3, dim=-1)


class MemoryFFN(nn.Module):
    """Two memory layers with a LayerNorm between them (paper Eq. 13)."""

    def __init__(self, dim: int, hidden: int, tau: int = 8, t: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.up = MemoryLinear(dim, hidden, tau, t, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, device=device, dtype=dtype)
        self.down = MemoryLinear(hidden, dim, tau, t, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.norm(self.up(x)))


class MemoryFormerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int = None, tau: int = 8, t: float = 1.0, causal: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide dim={dim}")
        self.n_heads, self.causal = n_heads, causal
        factory = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.qkv = MemoryQKV(dim, tau, t, **factory)
        self.out = MemoryLinear(dim, dim, tau, t, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        self.ffn = MemoryFFN(dim, hidden or 2 * dim, tau, t, **factory)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = (u.reshape(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for u in self.qkv(self.norm1(x)))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.ffn(self.norm2(x))
