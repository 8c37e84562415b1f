"""The main job: train a LLaMA-style model on real text with AdamW, GaLore and Q-GaLore, and compare.

Every method trains the same model (same seed, same batches) on the byte-level corpus of :mod:`weightkit.data`,
each at its own peak learning rate (``LR_TABLE``, from the papers, or picked by a short sweep), with linear warmup
and cosine decay. On CUDA the forward runs under bf16 autocast with float32 parameters, as a GPU user would train.
Reported per method: the rate used and where it came from, the loss curve, the validation loss over the whole
validation split, tokens/s (after the first steps), peak memory (``torch.cuda.max_memory_allocated`` on CUDA,
the process's peak RSS on CPU) and the bytes held in optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import multiprocessing as mp
import platform
import queue as queue_mod
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

METHODS = ("adamw", "galore", "galore-layerwise", "qgalore", "qgalore-layerwise", "galore-torch")
DEFAULT_METHODS = ("adamw", "galore", "qgalore")  # what a plain `weightkit train` compares
# Steps of a plain `weightkit train`: with the tiny model's 16 x 128 tokens per step the three default methods need
# about 200 x 2.0 = 400 CPU seconds of steps (STEP_COST below) plus ~30 s of start-up and evaluation: under 10
# minutes on a 2-core CPU even without any gain from the second core (the time is estimated and printed at the start).
DEFAULT_STEPS = 200
# * galore-layerwise: weightkit.optim.LayerwiseGaLore (GaLoreAdamW per parameter, stepped in backward, each gradient
#   freed in its hook): the memory the GaLore paper reports for its 7B run comes from this mode.
# * qgalore-layerwise: the same for Q-GaLore: QGaLoreAdamW8bit per parameter, each Int8Linear weight stepped from
#   its post-accumulate-grad hook (its gradient is an ordinary .grad) and the gradient freed there.
# * galore-torch: the reference implementation (pip galore-torch, GaLoreAdamW), the same groups, rank, gap and scale:
#   the peer of the GaLore-step issue's end-to-end table.
SIZES = ("tiny", "60m", "130m", "350m", "1b", "7b")
DTYPES = ("float32", "bfloat16")  # TrainConfig.dtype

# Peak learning rate (reached after warmup, then cosine decay) per method and model size, and its source.
# * galore: 0.01 with scale 0.25 (the projected update is scaled by 0.25, so attention/MLP weights move at an
#   effective 0.0025) and the subspace refreshed every 200 steps, the same for every size: GaLore, arXiv 2403.03507
#   (pre-training setup; jiaweizzhao/GaLore scripts/benchmark_c4/llama_{60m,130m,350m}.sh: --lr 0.01
#   --galore_scale 0.25 --update_proj_gap 200).
# * adamw: 1e-3, the full-rank AdamW baseline's rate at 60M-350M in GaLore's training code and the work built on it
#   (the GaLore paper tuned its baselines' rates; later work, e.g. APOLLO's 350M runs with 1024-token sequences,
#   found up to 5e-3 better: --lr-sweep checks on the run at hand).
# * qgalore: 0.015 at 60M and 130M, 0.01 at 350M, scale 0.25, gap 200: Q-GaLore, arXiv 2407.08296
#   (VITA-Group/Q-GaLore scripts/pretrain_c4/llama_{60m,130m,350m}.sh).
# tiny takes the 60M rates. The schedule is the papers' too: linear warmup over the first 10% of the steps, then
# cosine decay to 10% of the peak (GaLore's torchrun_main.py: --scheduler cosine --min_lr_ratio 0.1, warmup 10%).
# Override per method with --lr adamw=1e-3,galore=1e-2, or let --lr-sweep pick among nearby rates.
LR_TABLE: Dict[str, Dict[str, float]] = {
    "adamw": {"tiny": 1e-3, "60m": 1e-3, "130m": 1e-3, "350m": 1e-3},
    "galore": {"tiny": 1e-2, "60m": 1e-2, "130m": 1e-2, "350m": 1e-2},
    "qgalore": {"tiny": 1.5e-2, "60m": 1.5e-2, "130m": 1.5e-2, "350m": 1e-2},
}
for _rates in LR_TABLE.values():  # 1b / 7b (#24's memory runs): the 350m rates, not tuned at those sizes
    _rates["1b"] = _rates["7b"] = _rates["350m"]
LR_TABLE["galore-layerwise"] = LR_TABLE["galore-torch"] = LR_TABLE["galore"]
LR_TABLE["qgalore-layerwise"] = LR_TABLE["qgalore"]
LR_SOURCES = {
    "adamw": "full-rank AdamW baseline of GaLore's pretraining code (arXiv 2403.03507) at 60M-350M",
    "galore": "GaLore paper (arXiv 2403.03507): lr 0.01, scale 0.25, all sizes",
    "qgalore": "Q-GaLore (arXiv 2407.08296) pretrain_c4 scripts: 0.015 at 60M/130M, 0.01 at 350M, scale 0.25",
}
LR_SOURCES["galore-layerwise"] = LR_SOURCES["galore-torch"] = LR_SOURCES["galore"]
LR_SOURCES["qgalore-layerwise"] = LR_SOURCES["qgalore"]
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # --lr-sweep without explicit rates: the default rate and 3x either side

# Training defaults per model size: GaLore rank and refresh gap (the papers' 128 at 60M, 256 at 130M/350M, gap 200;
# tiny keeps d/4 and a gap of 50 for short CPU runs), and the batch (sequences x tokens).
TRAIN_PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": dict(rank=64, update_proj_gap=50, batch_size=16, seq_len=128),
    "60m": dict(rank=128, update_proj_gap=200, batch_size=16, seq_len=256),
    "130m": dict(rank=256, update_proj_gap=200, batch_size=8, seq_len=512),
    "350m": dict(rank=256, update_proj_gap=200, batch_size=8, seq_len=512),
    # the memory runs of #24: GaLore's 1B rank 512; 7B at rank 1024 with 16 x 256 tokens (Q-GaLore's 7B setting)
    "1b": dict(rank=512, update_proj_gap=200, batch_size=16, seq_len=256),
    "7b": dict(rank=1024, update_proj_gap=200, batch_size=16, seq_len=256),
}


@dataclass
class TrainConfig:
    """What to train. Fields left None come from the ``model_size`` preset (see :meth:`resolve`)."""

    model_size: str = "tiny"
    steps: int = DEFAULT_STEPS
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    lr: Optional[float] = None  # one peak rate for every method (instead of LR_TABLE)
    lrs: Dict[str, float] = field(default_factory=dict)  # peak rate per method (over ``lr`` and LR_TABLE)
    warmup: float = 0.1  # fraction of the steps with linear warmup
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak at the last step
    weight_decay: float = 0.0
    rank: Optional[int] = None
    update_proj_gap: Optional[int] = None
    galore_scale: float = 0.25
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    hidden_dim: Optional[int] = None
    seed: int = 0
    eval_every: int = 25
    eval_windows: int = 256  # validation: up to this many non-overlapping windows of the validation split
    threads: Optional[int] = None
    device: str = "cpu"
    checkpointing: bool = False  # activation checkpointing per transformer block (recompute in backward)
    svd: str = "exact"  # weightkit GaLore / Q-GaLore bases: 'exact' (the papers') or 'randomized' SVD
    stagger_refresh: bool = False  # weightkit GaLore: spread the layers' refreshes over the steps of a period
    # the parameters' dtype: float32 (bf16 autocast on CUDA), or bfloat16 as the GaLore / Q-GaLore papers' runs
    # (their --dtype bfloat16): weights, gradients, AdamW's moments, the residual stream and the blocks' inputs kept
    # for recomputation in bf16; Q-GaLore's Int8Linear weights are int8 either way
    dtype: str = "float32"
    # CUDA: allow TF32 for float32 matmuls (torch.backends.cuda.matmul.allow_tf32): GaLore's and Q-GaLore's
    # projections and the randomized SVD (the bf16-autocast forward does not use it); off: torch's default, strict
    tf32: bool = False
    # Q-GaLore: precision of the fused int8 write-back's low-rank product (QGaLoreAdamW8bit lowrank_precision)
    lowrank_precision: str = "fp32"

    def model_config(self):
        from weightkit.models.llama import preset

        return preset(self.model_size, max_seq_len=self.seq_len or 256, dim=self.dim, n_layers=self.n_layers,
                      n_heads=self.n_heads, hidden_dim=self.hidden_dim)

    def resolve(self) -> "TrainConfig":
        """A copy with every None filled from the presets, checked (ValueError names the bad field)."""
        if self.model_size not in SIZES:
            raise ValueError(f"unknown model size {self.model_size!r}; choose one of {', '.join(SIZES)}")
        tp = TRAIN_PRESETS[self.model_size]
        cfg = dataclasses.replace(self, lrs=dict(self.lrs))
        for name in ("batch_size", "seq_len", "update_proj_gap"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, tp[name])
        mc = cfg.model_config()
        cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim = mc.dim, mc.n_layers, mc.n_heads, mc.hidden_dim
        from weightkit.models.llama import PRESETS

        if cfg.rank is None:  # the preset's rank for its own width, d/4 for another width
            cfg.rank = tp["rank"] if cfg.dim == PRESETS[cfg.model_size][0] else max(1, cfg.dim // 4)
        for name in ("steps", "batch_size", "seq_len", "rank", "update_proj_gap", "eval_every", "eval_windows"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        longest = _longest_sequence()
        if cfg.seq_len > longest:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the validation split allows (at most {longest} "
                             "tokens: one window of the pydoc-topics text's last 5%)")
        if cfg.rank > min(cfg.dim, cfg.hidden_dim):
            raise ValueError(f"rank={cfg.rank} is larger than the model width (dim {cfg.dim})")
        from weightkit.optim.projector import SVD_METHODS

        if cfg.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {cfg.svd!r}")
        from weightkit.ops.qgalore import PRECISIONS

        if cfg.lowrank_precision not in PRECISIONS:
            raise ValueError(f"lowrank_precision must be one of {', '.join(PRECISIONS)}, got {cfg.lowrank_precision!r}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
        if not 0.0 <= cfg.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1), got {cfg.warmup}")
        if not 0.0 <= cfg.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
        for m, v in list(cfg.lrs.items()) + ([("every method", cfg.lr)] if cfg.lr is not None else []):
            if m != "every method" and m not in METHODS:
                raise ValueError(f"learning rate for unknown method {m!r}; methods are {', '.join(METHODS)}")
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"learning rate for {m} must be a finite number > 0, got {v!r}")
        return cfg

    def lr_for(self, method: str) -> Tuple[float, str]:
        """(peak learning rate, where it comes from) for ``method``."""
        if method in self.lrs:
            return float(self.lrs[method]), "--lr"
        if self.lr is not None:
            return float(self.lr), "--lr (every method)"
        return LR_TABLE[method][self.model_size], LR_SOURCES[method]


@functools.lru_cache(maxsize=1)
def _longest_sequence() -> int:
    """The longest seq_len the corpus allows: evaluation needs one window of seq_len + 1 tokens of the validation
    split."""
    from weightkit.data import byte_corpus

    return len(byte_corpus()[1]) - 1


@dataclass
class RunResult:
    method: str
    lr: float = float("nan")
    lr_source: str = ""
    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)  # mean over the steps since the previous point
    val_loss: float = float("nan")
    tokens_per_s: float = 0.0  # all steps after the first ``timed_from`` (periodic subspace refreshes included)
    tokens_per_s_median: float = 0.0  # median over the logging intervals (a refresh slows one interval only)
    timed_from: int = 0
    first_step_s: float = 0.0  # the first step alone (for GaLore and Q-GaLore: every layer's first SVD)
    step_ms_median: float = 0.0  # per-step time (CUDA events on CUDA, no sync per step), steps after the first
    step_ms_max: float = 0.0  # the slowest step after the first: a projector refresh's stall
    step_ms_max_at: int = 0  # which step that was
    optimizer_impl: str = ""  # e.g. "torch.optim.AdamW(fused=True)"
    peak_memory_mb: float = 0.0  # MiB: max_memory_allocated on CUDA, peak RSS on CPU
    peak_memory_kind: str = ""
    peak_rss_mb: float = 0.0
    optimizer_state_bytes: int = 0
    weight_bytes: int = 0
    memory_breakdown: Dict[str, int] = field(default_factory=dict)  # weightkit.memory.peak_breakdown
    n_params: int = 0
    seconds: float = 0.0
    device: str = ""
    autocast: Optional[str] = None
    sweep: List[Dict] = field(default_factory=list)  # --lr-sweep: every rate tried, with its validation loss
    error: Optional[str] = None  # compare(keep_going=True): why this method has no result


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, lists, tuples, objects' attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__"):  # a wrapper subclass (Int8Linear's weight): the tensors it holds
            from weightkit.nn.walk import stored_tensors

            return sum(tensor_bytes(t, seen) for t in stored_tensors(obj))
        key = (obj.untyped_storage().data_ptr(), obj.dtype, obj.shape)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


# -- command-line specs ------------------------------------------------------------------------------------------
def resolve_device(spec: str) -> str:
    """'auto' (CUDA when torch sees a device, else CPU), 'cpu', 'cuda' or 'cuda:N'; ValueError says what is wrong."""
    s = str(spec).strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return s
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m is None:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None else
               f"torch was built with CUDA {torch.version.cuda}; check the driver and CUDA_VISIBLE_DEVICES")
        raise ValueError(f"{spec} was requested but torch {torch.__version__} sees no CUDA device ({why}); "
                         "use --device cpu, or auto to take CUDA when present")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"{spec} was requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return s


def _rate(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what}: the learning rate must be a finite number > 0, got {text!r}")
    return v


def _method_items(spec: str, flag: str):
    seen = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        method, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise ValueError(f"{flag}: {item!r} should be METHOD=VALUE (e.g. adamw=1e-3)")
        if method not in METHODS:
            raise ValueError(f"{flag}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method in seen:
            raise ValueError(f"{flag}: {method} is given twice")
        seen.add(method)
        yield method, value


def parse_lr_spec(spec: str) -> Tuple[Dict[str, float], Optional[float]]:
    """``'adamw=1e-3,galore=1e-2'`` -> ({'adamw': 1e-3, 'galore': 1e-2}, None); a bare number -> ({}, rate) for
    every method."""
    spec = spec.strip()
    if not spec:
        raise ValueError("--lr: empty; give METHOD=RATE pairs, e.g. adamw=1e-3,galore=1e-2")
    if "=" not in spec and "," not in spec:
        return {}, _rate(spec, "--lr")
    return {m: _rate(v, f"--lr {m}") for m, v in _method_items(spec, "--lr")}, None


def parse_sweep_spec(spec: str, methods: Sequence[str]) -> Dict[str, Optional[List[float]]]:
    """``--lr-sweep`` value: '' sweeps every method over its default rate x SWEEP_FACTORS (None); 'adamw=3e-4:1e-3'
    gives one method explicit rates (the others keep the default grid)."""
    grids: Dict[str, Optional[List[float]]] = {m: None for m in methods}
    for m, value in _method_items(spec or "", "--lr-sweep"):
        if m not in methods:
            raise ValueError(f"--lr-sweep: {m} is not among --methods ({', '.join(methods)})")
        rates = [_rate(v, f"--lr-sweep {m}") for v in value.split(":") if v.strip()]
        if not rates:
            raise ValueError(f"--lr-sweep: no rates for {m}; write {m}=RATE:RATE:...")
        grids[m] = sorted(set(rates))
    return grids


# -- schedule ----------------------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int, warmup: float = 0.1, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based) of ``steps``: linear warmup over the first
    ``round(warmup * steps)`` steps (the last of them at the peak), then cosine decay to ``min_ratio`` at the last
    step. The first step trains at peak / warmup_steps, not at 0."""
    w = int(round(warmup * steps))
    if step < w:
        return (step + 1) / w
    span = steps - 1 - w
    if span <= 0:
        return 1.0
    p = min(1.0, (step - w) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


class _LayerwiseLR:
    """LambdaLR's schedule for a LayerwiseGaLore (one optimizer per parameter, stepped inside backward): the rate of
    every group of every per-parameter optimizer is ``base * factor(step)``, set at construction (step 0) and by
    each ``step()``, so the updates of step t (made during its backward) use factor(t), as LambdaLR would."""

    def __init__(self, layerwise, factor: Callable[[int], float]):
        self.factor, self.last_epoch = factor, 0
        self.groups = [g for o in layerwise.optimizers for g in o.param_groups]
        self.base = [g["lr"] for g in self.groups]
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.last_epoch)
        for g, b in zip(self.groups, self.base):
            g["lr"] = b * f

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()


def make_scheduler(opt, cfg: TrainConfig):
    # GaLoreAdamW and QGaLoreAdamW8bit subclass torch.optim.Optimizer and read group["lr"] at every step (their
    # weight decay too), so LambdaLR drives them like AdamW; LayerwiseGaLore gets the same schedule per parameter.
    factor = functools.partial(lr_factor, steps=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    from weightkit.optim import LayerwiseGaLore

    if isinstance(opt, LayerwiseGaLore):
        return _LayerwiseLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- model and optimizer -----------------------------------------------------------------------------------------
def build_optimizer(method: str, model: nn.Module, cfg: TrainConfig, lr: Optional[float] = None):
    from weightkit.optim import param_groups

    lr = cfg.lr_for(method)[0] if lr is None else lr
    if method == "adamw":  # fused on CUDA: what a GPU user runs (one kernel for all parameters)
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    groups = param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale)
    if method == "galore":
        from weightkit.optim import GaLoreAdamW

        return GaLoreAdamW(groups, lr=lr, weight_decay=cfg.weight_decay, svd=cfg.svd,
                           stagger_refresh=cfg.stagger_refresh)
    if method == "galore-layerwise":
        from weightkit.optim import GaLoreAdamW, LayerwiseGaLore

        return LayerwiseGaLore(groups, optimizer_cls=GaLoreAdamW, lr=lr, weight_decay=cfg.weight_decay, svd=cfg.svd,
                               stagger_refresh=cfg.stagger_refresh)
    if method == "galore-torch":
        try:
            from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW
        except ImportError as exc:
            raise ValueError(f"method galore-torch needs the galore-torch package (pip install galore-torch): "
                             f"{exc}") from None
        return ReferenceGaLoreAdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    if method == "qgalore":
        from weightkit.optim import QGaLoreAdamW8bit

        return QGaLoreAdamW8bit(groups, lr=lr, weight_decay=cfg.weight_decay, svd=cfg.svd,  # lazy refresh: no stagger
                                lowrank_precision=cfg.lowrank_precision)
    if method == "qgalore-layerwise":
        from weightkit.optim import LayerwiseGaLore, QGaLoreAdamW8bit

        return LayerwiseGaLore(groups, optimizer_cls=QGaLoreAdamW8bit, lr=lr, weight_decay=cfg.weight_decay,
                               svd=cfg.svd, lowrank_precision=cfg.lowrank_precision)
    raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")


def int8_group_size(in_features: int, cap: int = 128) -> int:
    """Quantization group of an Int8Linear: the largest power of two <= ``cap`` dividing ``in_features`` (groups
    stay within a row; 350m's SwiGLU width 2736 = 16 * 171 gets 16, its 1024-wide layers 128)."""
    g = cap
    while in_features % g:
        g //= 2
    return g


def prepare_model(method: str, cfg: TrainConfig, device=None) -> nn.Module:
    """The model, built on ``device`` (default: the CPU) from the seed: the same initial weights for every method on
    a device. Q-GaLore's block linears become weightkit.nn.Int8Linear (INT8 weights with per-group scales, trained
    through QGaLoreAdamW8bit)."""
    from weightkit.models import TinyLlama
    from weightkit.nn.walk import linear_layers, skipped_by_default

    cfg = cfg.resolve()
    torch.manual_seed(cfg.seed)
    with torch.device(device or "cpu"):  # on CUDA: initialized there, no 300M-parameter init on the host
        model = TinyLlama(cfg.model_config())
        if cfg.dtype != "float32":
            model.to(getattr(torch, cfg.dtype))  # before the swap: Int8Linear keeps the layer's dtype for compute
    model.gradient_checkpointing = cfg.checkpointing
    if method in ("qgalore", "qgalore-layerwise"):
        from weightkit import swap

        def block_linear(name, m):
            return not skipped_by_default(name)

        linears = [m for _, m in linear_layers(model, block_linear)]
        replaced = 0
        for group in sorted({int8_group_size(m.in_features) for m in linears}):
            report = swap(model, "int8", group_size=group,
                          filter_fn=lambda n, m, g=group: block_linear(n, m) and int8_group_size(m.in_features) == g)
            replaced += len(report.replaced)
        if replaced != len(linears):
            raise ValueError(f"only {replaced} of {len(linears)} block linears could be made Int8Linear")
    return model


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: TrainConfig, device=None) -> float:
    """Mean loss over the first ``cfg.eval_windows`` non-overlapping windows of ``data`` (the whole validation split
    at the default sizes): the same tokens for every method, no sampling noise."""
    from weightkit.data import windows

    device = torch.device(device or cfg.device)
    x, y = windows(data, cfg.seq_len, cfg.eval_windows)
    total = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, len(x), cfg.batch_size):
        xb, yb = _to(x[i:i + cfg.batch_size], device), _to(y[i:i + cfg.batch_size], device)
        with _autocast(device):
            total += model(xb, yb).double() * len(xb)
    model.train()
    return float(total) / len(x)


class _DropBnbCpuProbe(logging.Filter):
    # bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a CPU
    # 4-bit GEMM) is missing; weightkit uses only its blockwise 8-bit quantization, so the message is noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


def _quiet_third_party() -> None:
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropBnbCpuProbe) for f in log.filters):
        log.addFilter(_DropBnbCpuProbe())


class _NoBar:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **kwargs) -> None:
        pass


def _progress(steps, method: str, enabled: bool):
    """A tqdm bar over ``steps`` (a plain iteration when disabled or tqdm is not installed)."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar(steps)
        return tqdm(steps, desc=f"{method:>8}", leave=True)
    return _NoBar(steps)


def timing_start(steps: int) -> int:
    """Steps excluded from tokens/s: the first 10% (at most 10, at least 1 when there are 2+ steps): CUDA/BLAS
    warm-up, allocator growth and the first projector SVDs."""
    return 0 if steps < 2 else min(10, max(1, steps // 10))


def run(method: str, cfg: TrainConfig, progress: bool = True, lr: Optional[float] = None,
        lr_source: Optional[str] = None) -> RunResult:
    """Train with one method in this process and measure it (TF32 matmuls as ``cfg.tf32`` says, put back after)."""
    from weightkit.backend import allow_tf32

    with allow_tf32(cfg.tf32):
        return _run(method, cfg, progress, lr, lr_source)


def _run(method: str, cfg: TrainConfig, progress: bool, lr: Optional[float], lr_source: Optional[str]) -> RunResult:
    from weightkit.data import batches as make_batches
    from weightkit.data import byte_corpus
    from weightkit.models.llama import num_parameters

    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    cfg = cfg.resolve()
    if lr is None:
        lr, lr_source = cfg.lr_for(method)
    _quiet_third_party()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # torch.cuda.set_device needs an index
    train, val = byte_corpus()
    if cuda:
        torch.cuda.set_device(device)
    model = prepare_model(method, cfg, device)
    if cuda:  # the peak counts from here: live weights included, not the float copies Q-GaLore's swap freed
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    opt = build_optimizer(method, model, cfg, lr)
    sched = make_scheduler(opt, cfg)
    layerwise = method in ("galore-layerwise", "qgalore-layerwise")  # updates inside backward: no step() call
    impl = type(opt.optimizers[0] if layerwise and opt.optimizers else opt)
    fused = " (fused=True)" if method == "adamw" and opt.defaults.get("fused") else ""
    gen = torch.Generator().manual_seed(cfg.seed)
    it = make_batches(train, cfg.batch_size, cfg.seq_len, gen)
    tokens = cfg.batch_size * cfg.seq_len
    result = RunResult(method, lr=lr, lr_source=lr_source or "", n_params=num_parameters(cfg.model_config()),
                       device=torch.cuda.get_device_name(device) if cuda else
                       f"{platform.machine()} CPU x{torch.get_num_threads()}",
                       autocast="bfloat16" if cuda else None,
                       optimizer_impl=f"{'LayerwiseGaLore of ' if layerwise else ''}{impl.__module__}.{impl.__name__}"
                                      f"{fused}")
    # per-step times without a sync per step: CUDA events recorded after each step, read once at the end
    step_marks: List = []
    # The loss is summed on the device and read at the logging points only: no host sync in between (on CUDA the
    # host queues steps ahead of the GPU). Those reads are also where the loss is checked for NaN/Inf.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    n_sum = 0
    skip = timing_start(cfg.steps)
    marks: List[Tuple[int, float]] = []  # (step, time) at synchronized points from step ``skip`` on
    _sync(device)
    start = time.perf_counter()
    if skip == 0:
        marks.append((0, start))
    if cuda:
        first_event = torch.cuda.Event(enable_timing=True)
        first_event.record()
    bar = _progress(range(1, cfg.steps + 1), method, progress)
    for step in bar:
        x, y = next(it)
        with _autocast(device):
            loss = model(_to(x, device), _to(y, device))
        loss.backward()
        if not layerwise:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            step_marks.append(ev)
        else:
            step_marks.append(time.perf_counter())
        loss_sum += loss.detach()
        n_sum += 1
        if step == 1:
            _sync(device)
            result.first_step_s = time.perf_counter() - start  # GaLore/Q-GaLore: includes the first SVDs
        if step % cfg.eval_every == 0 or step == cfg.steps:
            mean = float(loss_sum) / n_sum  # synchronizes
            if not math.isfinite(mean):
                raise RuntimeError(f"{method} at lr {lr:g}: the training loss became {mean} by step {step}")
            result.steps.append(step)
            result.train_loss.append(mean)
            loss_sum.zero_()
            n_sum = 0
            if step > skip:
                marks.append((step, time.perf_counter()))
            bar.set_postfix(loss=f"{mean:.3f}")
        if step == skip:
            _sync(device)
            marks.append((step, time.perf_counter()))
    result.seconds = time.perf_counter() - start
    if cuda:
        _sync(device)
        ms = [a.elapsed_time(b) for a, b in zip([first_event] + step_marks, step_marks)]
    else:
        ms = [1e3 * (b - a) for a, b in zip([start] + step_marks, step_marks)]
    later = ms[1:]  # the first step (CUDA/BLAS warm-up, every layer's first SVD) is first_step_s
    if later:
        result.step_ms_median = statistics.median(later)
        result.step_ms_max = max(later)
        result.step_ms_max_at = 2 + later.index(result.step_ms_max)
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    result.timed_from = s0
    result.tokens_per_s = (s1 - s0) * tokens / max(t1 - t0, 1e-9)
    rates = [(b[0] - a[0]) * tokens / max(b[1] - a[1], 1e-9) for a, b in zip(marks, marks[1:])]
    result.tokens_per_s_median = statistics.median(rates) if rates else result.tokens_per_s
    result.val_loss = evaluate(model, val, cfg, device)
    result.optimizer_state_bytes = tensor_bytes([o.state for o in opt.optimizers] if layerwise else opt.state)
    result.weight_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if cuda:
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.peak_memory_kind = "CUDA max_memory_allocated"
    else:
        result.peak_memory_mb = result.peak_rss_mb
        result.peak_memory_kind = "peak RSS"
    result.memory_breakdown = _breakdown(model, opt, layerwise, next(it), device, int(result.peak_memory_mb * 2**20))
    return result


def _breakdown(model, opt, layerwise, batch, device, peak_bytes) -> Dict[str, int]:
    """The measured peak split into its parts (weightkit.memory), activations measured on one more batch."""
    from weightkit.memory import activation_bytes, peak_breakdown

    model.train()  # (evaluate() left it in eval mode, where blocks are not checkpointed)
    acts = activation_bytes(model, _to(batch[0], device), _to(batch[1], device), lambda: _autocast(device))
    return peak_breakdown(peak_bytes, model, [o.state for o in opt.optimizers] if layerwise else opt.state,
                          layerwise, acts)


def sweep(method: str, cfg: TrainConfig, rates: Sequence[float], steps: int, progress: bool = True) -> List[Dict]:
    """Train ``method`` for ``steps`` steps (same warmup/cosine schedule, shortened) at each rate; return
    [{'lr', 'val_loss', 'train_loss', 'error'}] (a diverging rate gets val_loss None and the error)."""
    short = dataclasses.replace(cfg.resolve(), steps=steps, eval_every=max(1, steps // 10))
    out = []
    for lr in rates:
        entry: Dict = {"lr": float(lr), "val_loss": None, "train_loss": None, "error": None}
        try:
            r = run(method, short, progress=progress, lr=float(lr), lr_source="sweep")
            entry.update(val_loss=r.val_loss if math.isfinite(r.val_loss) else None, train_loss=r.train_loss[-1])
        except (RuntimeError, FloatingPointError) as exc:
            if "out of memory" in str(exc):
                raise
            entry["error"] = f"{type(exc).__name__}: {exc}"
        out.append(entry)
        gc.collect()
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
    return out


# -- several methods, each in its own process ----------------------------------------------------------------------
_CHILD_FUNCS = {"run": run, "sweep": sweep}  # and "probe" (probe_step_seconds, below)


def _child(func: str, kwargs: Dict, out) -> None:
    try:
        kwargs = dict(kwargs, cfg=TrainConfig(**kwargs["cfg"]))
        value = _CHILD_FUNCS[func](**kwargs)
        out.put(("ok", asdict(value) if isinstance(value, RunResult) else value))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _call(func: str, isolate: bool, what: str, **kwargs):
    """``func(**kwargs)`` here, or in a fresh spawned process when ``isolate``.

    A process per method on CPU and CUDA alike: its peak RSS is its own, and on CUDA each method starts from a
    fresh context and caching allocator (no blocks, cuBLAS workspaces or fragmentation left by the previous
    method), so max_memory_allocated and tokens/s cannot depend on the order of the methods; a crash or OOM stays
    in its process and is reported. The cost is a few seconds of start-up per process, outside all timings."""
    if not isolate:
        return _CHILD_FUNCS[func](**kwargs)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(func, dict(kwargs, cfg=asdict(kwargs["cfg"])), out))
    proc.start()
    while True:
        try:
            status, payload = out.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                try:
                    status, payload = out.get(timeout=5.0)
                    break
                except queue_mod.Empty:
                    raise RuntimeError(f"{what}: the process died (exit code {proc.exitcode})") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{what} failed: {payload}")
    return RunResult(**payload) if func == "run" else payload


def compare(methods=DEFAULT_METHODS, cfg: Optional[TrainConfig] = None, isolate: bool = True,
            sweep_rates: Optional[Dict[str, Optional[Sequence[float]]]] = None, sweep_steps: Optional[int] = None,
            on_result: Optional[Callable[[List[RunResult]], None]] = None, progress: bool = True,
            keep_going: bool = False) -> List[RunResult]:
    """Run each method (each in a fresh process when ``isolate``) and return their results.

    ``sweep_rates`` ({method: rates, or None for the default rate x SWEEP_FACTORS}) first trains each listed method
    for ``sweep_steps`` steps per rate and keeps the rate with the lowest validation loss; every rate tried is in
    the result's ``sweep``. ``on_result(results_so_far)`` runs after each method (e.g. to save partial results).
    With ``keep_going`` a method that fails gets a result with ``error`` set and the next method runs."""
    cfg = (cfg or TrainConfig()).resolve()
    results: List[RunResult] = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")
        lr, source = cfg.lr_for(method)
        trials: List[Dict] = []
        try:
            if sweep_rates is not None and method in sweep_rates:
                rates = sweep_rates[method] or [lr * f for f in SWEEP_FACTORS]
                steps = sweep_steps or max(10, cfg.steps // 4)
                trials = _call("sweep", isolate, f"the {method} lr sweep", method=method, cfg=cfg, rates=list(rates),
                               steps=steps, progress=progress)
                ok = [t for t in trials if t["val_loss"] is not None]
                if not ok:
                    raise RuntimeError(f"{method}: every rate of the sweep failed: {[t['error'] for t in trials]}")
                best = min(ok, key=lambda t: t["val_loss"])
                lr, source = best["lr"], f"sweep: lowest validation loss of {len(trials)} rates over {steps} steps"
                for t in trials:
                    t["chosen"] = t is best
            result = _call("run", isolate, f"training with {method}", method=method, cfg=cfg, progress=progress,
                           lr=lr, lr_source=source)
        except RuntimeError as exc:
            if not keep_going:
                raise
            result = RunResult(method, lr=lr, lr_source=source, error=str(exc))
        result.sweep = trials
        results.append(result)
        if on_result is not None:
            on_result(results)
    return results


# -- how long a run will take (printed before it starts) -----------------------------------------------------------
# Time of one training step of each method relative to AdamW's, measured with the tiny model on this project's 2-core
# CPU machine (2026-12-04; CPU seconds per step of one thread, the methods' steps interleaved so that the machine's
# other load hit them alike: AdamW 0.63 s, GaLore 0.66, Q-GaLore 0.75, their layer-wise modes 0.67 and 0.74, the
# first step with every layer's SVD 0.9-1.0). galore-torch was not measured: taken as GaLore's. Other sizes and
# devices weigh the optimizer step differently, so the estimate says "about".
STEP_COST = {"adamw": 1.0, "galore": 1.04, "galore-layerwise": 1.05, "qgalore": 1.18, "qgalore-layerwise": 1.17,
             "galore-torch": 1.04}
PROCESS_START_S = 5.0  # each method's process: importing torch and weightkit, the corpus, building the model


def probe_step_seconds(cfg: TrainConfig, steps: int = 2) -> float:
    """Seconds of one AdamW training step of ``cfg``'s model and batch on its device, the mean of ``steps`` steps
    after a warm-up step."""
    from weightkit.data import batches, byte_corpus

    cfg = cfg.resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model = prepare_model("adamw", cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(byte_corpus()[0], cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed))

    def one_step() -> None:
        x, y = next(data)
        with _autocast(device):
            loss = model(_to(x, device), _to(y, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    return (time.perf_counter() - start) / steps


_CHILD_FUNCS["probe"] = probe_step_seconds


def estimate_seconds(methods: Sequence[str], cfg: TrainConfig, step_s: float,
                     sweep_rates: Optional[Dict[str, Optional[Sequence[float]]]] = None,
                     sweep_steps: Optional[int] = None) -> float:
    """Seconds that ``compare(methods, cfg, sweep_rates=..., sweep_steps=...)`` should take, given ``step_s``, the
    time of one AdamW step (:func:`probe_step_seconds`): each method's steps scaled by STEP_COST, its evaluations
    (forward passes, about a third of a step per batch) and its processes' start."""
    cfg = cfg.resolve()
    evaluations = math.ceil(min(cfg.eval_windows, _longest_sequence() // cfg.seq_len) / cfg.batch_size)
    total = 0.0
    for method in methods:
        runs = [cfg.steps]
        processes = 1
        if sweep_rates is not None and method in sweep_rates:
            runs += [sweep_steps or max(10, cfg.steps // 4)] * len(sweep_rates[method] or SWEEP_FACTORS)
            processes += 1
        total += processes * PROCESS_START_S
        total += sum(steps * step_s * STEP_COST.get(method, max(STEP_COST.values())) + evaluations * step_s / 3
                     for steps in runs)
    return total


def estimate_line(methods: Sequence[str], cfg: TrainConfig,
                  sweep_rates: Optional[Dict[str, Optional[Sequence[float]]]] = None,
                  sweep_steps: Optional[int] = None) -> str:
    """One line for the start of a run: about how long it will take, from a two-step probe of the model here (a
    few seconds; on CUDA in a separate process, so that this one holds no CUDA context during the run)."""
    cfg = cfg.resolve()
    cuda = torch.device(cfg.device).type == "cuda"
    step_s = _call("probe", cuda, "the timing probe", cfg=cfg)
    seconds = estimate_seconds(methods, cfg, step_s, sweep_rates, sweep_steps)
    when = f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"
    sweep = " plus the learning-rate sweeps" if sweep_rates else ""
    return (f"estimated time: about {when} for {len(methods)} method(s) x {cfg.steps} steps{sweep} (one AdamW step "
            f"took {step_s * 1e3:.0f} ms here just now; each method runs in its own process with a progress bar)")


# -- output --------------------------------------------------------------------------------------------------------
def describe(cfg: TrainConfig, results: Sequence[RunResult] = ()) -> List[str]:
    from weightkit.models.llama import num_parameters

    cfg = cfg.resolve()
    n = num_parameters(cfg.model_config())
    dev = f"{cfg.device} ({results[0].device})" if results and results[0].device else cfg.device
    cuda = torch.device(cfg.device).type == "cuda"
    if cfg.dtype == "bfloat16":
        amp = "bf16 parameters" + (" under bf16 autocast" if cuda else "")
    else:
        amp = "bf16 autocast, fp32 parameters" if cuda else "fp32"
    w = int(round(cfg.warmup * cfg.steps))
    return [f"model {cfg.model_size}: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, SwiGLU "
            f"{cfg.hidden_dim}, {n / 1e6:.2f}M parameters ({n:,}); {dev}, {amp}",
            f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens; each method's peak lr with {w} warmup "
            f"steps, then cosine decay to {cfg.min_lr_ratio:g}x; GaLore/Q-GaLore rank {cfg.rank}, refresh gap "
            f"{cfg.update_proj_gap}, scale {cfg.galore_scale:g}; tokens/s from step {timing_start(cfg.steps)} on"
            + ("; activation checkpointing per block" if cfg.checkpointing else "")
            + (f"; {cfg.svd} SVD" if cfg.svd != "exact" else "")
            + ("; staggered refreshes" if cfg.stagger_refresh else "")
            + ("; TF32 matmuls allowed" if cfg.tf32 else "")
            + (f"; Q-GaLore write-back product in {cfg.lowrank_precision}" if cfg.lowrank_precision != "fp32" else "")]


def report(results: List[RunResult], cfg: Optional[TrainConfig] = None) -> str:
    done = [r for r in results if r.error is None]
    base = next((r for r in done if r.method == "adamw"), None)
    kind = done[0].peak_memory_kind if done else ""
    lines = describe(cfg, done) + [""] if cfg is not None else []
    lines += [f"| method | peak lr | final train loss | val loss | tokens/s (median interval) | step ms median / max "
              f"(at step) | peak memory MiB ({kind}) | optimizer state MB | state vs AdamW | weights MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.method} | {r.lr:.3g} | failed: {r.error[-300:]} ||||||||")
            continue
        ratio = f"{r.optimizer_state_bytes / base.optimizer_state_bytes:.1%}" if base and base.optimizer_state_bytes else "-"
        lines.append(f"| {r.method} | {r.lr:.3g} | {r.train_loss[-1]:.3f} | {r.val_loss:.3f} | {r.tokens_per_s:,.0f} "
                     f"({r.tokens_per_s_median:,.0f}) | {r.step_ms_median:,.1f} / {r.step_ms_max:,.1f} ({r.step_ms_max_at}) | "
                     f"{r.peak_memory_mb:,.0f} | {r.optimizer_state_bytes / 1e6:.2f} | "
                     f"{ratio} | {r.weight_bytes / 1e6:.2f} |")
    lines.append("")
    if done:
        lines.append("first step (GaLore/Q-GaLore: every layer's first SVD; excluded from tokens/s): "
                     + ", ".join(f"{r.method} {r.first_step_s:.2f} s" for r in done))
    from weightkit.memory import format_breakdown

    for r in done:
        if r.memory_breakdown:
            lines += [f"{r.method} peak memory breakdown:", format_breakdown(r.memory_breakdown, r.peak_memory_kind)]
    lines += [f"{r.method} lr {r.lr:.3g}: {r.lr_source}" for r in results]
    lines += [f"{r.method} optimizer: {r.optimizer_impl}" for r in done if r.optimizer_impl]
    swept = [r for r in results if r.sweep]
    if swept:
        lines += ["", "| lr sweep | rate | val loss | |", "|---|---|---|---|"]
        for r in swept:
            for t in r.sweep:
                val = f"{t['val_loss']:.3f}" if t["val_loss"] is not None else f"failed ({t['error'][:80]})"
                lines.append(f"| {r.method} | {t['lr']:.3g} | {val} | {'chosen' if t.get('chosen') else ''} |")
    return "\n".join(lines)


def plot(results: List[RunResult], path: str, cfg: Optional[TrainConfig] = None) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in (r for r in results if r.error is None):
        ax.plot(r.steps, r.train_loss, label=f"{r.method}, lr {r.lr:.3g} (val {r.val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    size = f"LLaMA {cfg.resolve().model_size}" if cfg is not None else "TinyLlama"
    ax.set_title(f"{size} on pydoc topics: " + " vs ".join(r.method for r in results if r.error is None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # noqa: BLE001 - not importable here: no version to record
        return None
    return triton.__version__


def _weightkit_version() -> str:
    import weightkit

    return weightkit.__version__


def save(results: List[RunResult], cfg: TrainConfig, path: str) -> None:
    cfg = cfg.resolve()
    payload = {"config": asdict(cfg), "model": describe(cfg, results), "results": [asdict(r) for r in results],
               "lr_table": LR_TABLE, "lr_sources": LR_SOURCES,
               "schedule": f"linear warmup over round({cfg.warmup:g} * steps) steps, then cosine decay to "
                           f"{cfg.min_lr_ratio:g} x peak at the last step",
               "torch": torch.__version__, "triton": _triton_version(), "weightkit": _weightkit_version(),
               "device": next((r.device for r in results if r.device), cfg.device), "date": time.strftime("%Y-%m-%d")}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
