"""A small LLaMA-style decoder (RMSNorm, rotary attention, SwiGLU MLP) built from nn.Linear layers, so that
weightkit.swap and weightkit.optim.param_groups see the same module structure as a real LLaMA.

``PRESETS`` names the shapes used by ``python -m weightkit train --model-size``: ``tiny`` (the CPU default) and the
LLaMA configs of the GaLore paper (arXiv 2403.03507; ``configs/llama_{60m,130m,350m,1b,7b}.json`` of its
repository: hidden size, SwiGLU intermediate size, heads, layers; 1b and 7b are also Q-GaLore's, arXiv 2407.08296).
The paper's names count a 32000-token vocabulary (embedding
and untied head); the vocabulary here is 256 bytes, so the models are smaller: see :func:`num_parameters`
(tiny: 3.3M, 60m: 25.6M, 130m: 85.3M, 350m: 302.9M, 1b: 1.21B, 7b: 6.48B parameters; the 7b shape matches
LLaMA-7B's blocks)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 256  # byte-level
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 688  # ~ 8/3 * dim, SwiGLU
    max_seq_len: int = 256
    norm_eps: float = 1e-5


def swiglu_hidden(dim: int) -> int:
    """SwiGLU width ~ 8/3 * dim rounded up to a multiple of 64 (the width used when only ``dim`` is given)."""
    return -(-8 * dim // 3 // 64) * 64


# name: (dim, n_layers, n_heads, hidden_dim)
PRESETS = {
    "tiny": (256, 4, 4, swiglu_hidden(256)),  # the CPU default of weightkit train (3.3M parameters)
    "60m": (512, 8, 8, 1376),  # GaLore configs/llama_60m.json
    "130m": (768, 12, 12, 2048),  # GaLore configs/llama_130m.json
    "350m": (1024, 24, 16, 2736),  # GaLore configs/llama_350m.json
    "1b": (2048, 24, 32, 5461),  # GaLore configs/llama_1b.json
    "7b": (4096, 32, 32, 11008),  # GaLore configs/llama_7b.json (LLaMA-7B)
}


def preset(name: str, max_seq_len: int = 256, **overrides) -> LlamaConfig:
    """The LlamaConfig of a named preset; ``overrides`` replace fields (e.g. ``dim``, ``n_layers``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}")
    dim, n_layers, n_heads, hidden = PRESETS[name]
    fields = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, hidden_dim=hidden, max_seq_len=max_seq_len)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if fields["dim"] != dim and overrides.get("hidden_dim") is None:
        fields["hidden_dim"] = swiglu_hidden(fields["dim"])  # a new width: the SwiGLU rule, not the preset's
    for key in ("dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
        if isinstance(fields[key], bool) or not isinstance(fields[key], int) or fields[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {fields[key]!r}")
    if fields["dim"] % fields["n_heads"] or (fields["dim"] // fields["n_heads"]) % 2:
        raise ValueError(f"dim={fields['dim']} must split into n_heads={fields['n_heads']} heads of even size "
                         "(rotary embedding)")
    return LlamaConfig(**fields)


def num_parameters(cfg: LlamaConfig) -> int:
    """Parameters of ``TinyLlama(cfg)``: embedding and head (untied), per block 4 dim^2 attention + 3 dim*hidden
    SwiGLU + two norms, and the final norm."""
    block = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim
    return 2 * cfg.vocab_size * cfg.dim + cfg.n_layers * block + cfg.dim


def _compute(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32 (float64 stays float64)


def rms_norm_reference(x, weight, eps: float):
    """LLaMA's RMSNorm in float32 (float64 for float64 x), cast back to x's dtype, times the weight (what autograd
    saves for it: x in float32, 1/rms, and the normalized x in x's dtype)."""
    xf = _compute(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm_reference` keeping only x and the per-row 1/rms for backward, which recomputes the rest: the
    same ops as autograd's backward of the reference, so the same bits (tests/test_memory.py). For bf16 x it keeps
    2 bytes a value where the reference keeps 6 (x in float32, the normalized x in bf16); for float32 x, 4 where
    the reference keeps 8. With checkpointing, x is the block's input, kept anyway."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = _compute(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xf = _compute(x)  # (x itself for float32 x: never written)
        dw = dx = None
        if ctx.needs_input_grad[1]:
            normed = (xf * rstd).type_as(x)
            dw = (dy * normed).sum_to_size(weight.shape).to(weight.dtype)
            del normed
        if ctx.needs_input_grad[0]:  # autograd's chain: mul, type_as, mul, rsqrt, mean, pow
            dn = (dy * weight).to(x.dtype).to(xf.dtype)  # (autograd casts each grad to its input's dtype)
            dr = (dn * xf).sum_to_size(rstd.shape)
            # autograd: mean's backward (-0.5 dr rstd^3, expanded, / N) times pow's 2 xf. 2 (c / N) times xf is the
            # same bits (a factor of 2 is exact), with no full-size temporary for each factor; then in place
            k = (-0.5 * dr * rstd.pow(3)) / xf.shape[-1] * 2.0
            dx = dn.mul_(rstd)
            dx.add_(xf * k)
            dx = dx.to(x.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def silu_mul_reference(gate, up):
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    """SwiGLU's silu(gate) * up keeping gate and up for backward (autograd's keeps silu(gate) too: a third tensor of
    the MLP's width), recomputing silu(gate) there: autograd's backward ops, the same bits. Backward has at most two
    tensors of the MLP's width of its own alive at once (d_gate, then silu(gate) multiplied by dy in place into d_up;
    a 7B MLP's: 86 MiB each at 16 x 256 tokens)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(dy * up, gate) if ctx.needs_input_grad[0] else None
        d_up = None
        if ctx.needs_input_grad[1]:
            s = F.silu(gate)  # dy * s in place where it keeps s's dtype (products commute exactly: the same bits)
            d_up = s.mul_(dy) if torch.result_type(s, dy) == s.dtype else dy * s
        return d_gate, d_up


def silu_mul(gate, up):
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return silu_mul_reference(gate, up)


def _rotary(seq_len: int, head_dim: int, device) -> tuple:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return angles.cos(), angles.sin()


def _apply_rotary(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attention_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # True: each block's activations are recomputed in backward
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens, targets=None):
        cos, sin = _rotary(tokens.shape[1], self.cfg.dim // self.cfg.n_heads, tokens.device)
        x = self.embed_tokens(tokens)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def unigram_entropy_bits(data: torch.Tensor, vocab: int = 256) -> float:
    """Entropy (bits per token) of the token frequencies: the loss a model with no context would reach."""
    p = torch.bincount(data.flatten(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
