"""The main job: train a small LLaMA-style model on real text with AdamW, GaLore and Q-GaLore, and compare.

Each method runs in its own process (so its peak memory is its own), on the byte-level corpus of
:mod:`weightkit.data`, with the same seed, model and batches. Reported per method: the loss curve, the final
validation loss, tokens/s, peak resident memory of the process, and the bytes held in optimizer state.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

METHODS = ("adamw", "galore", "qgalore")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    rank: int = 64
    update_proj_gap: int = 50
    galore_scale: float = 0.25
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seed: int = 0
    eval_every: int = 25
    threads: Optional[int] = None


@dataclass
class RunResult:
    method: str
    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    val_loss: float = float("nan")
    tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    optimizer_state_bytes: int = 0
    weight_bytes: int = 0
    seconds: float = 0.0


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, lists, tuples, objects' attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
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


def build_optimizer(method: str, model: nn.Module, cfg: TrainConfig):
    from weightkit.optim import param_groups

    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = param_groups(model, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale)
    if method == "galore":
        from weightkit.optim import GaLoreAdamW

        return GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if method == "qgalore":
        from weightkit.optim import QGaLoreAdamW8bit

        return QGaLoreAdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")


def prepare_model(method: str, cfg: TrainConfig) -> nn.Module:
    from weightkit.models import LlamaConfig, TinyLlama

    torch.manual_seed(cfg.seed)
    hidden = -(-8 * cfg.dim // 3 // 64) * 64  # SwiGLU width ~8/3 dim, a multiple of 64
    model = TinyLlama(LlamaConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, hidden_dim=hidden,
                                  max_seq_len=cfg.seq_len))
    if method == "qgalore":
        from weightkit import swap

        group = min(128, math.gcd(cfg.dim, hidden))
        report = swap(model, "int8", group_size=group)  # Q-GaLore keeps the block weights in INT8
        if not report.replaced:
            raise ValueError(f"no layer could be made Int8Linear with group_size={group}: {report.skipped[:3]}")
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: TrainConfig, batches: int = 8) -> float:
    from weightkit.data import batches as make_batches

    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = make_batches(data, cfg.batch_size, cfg.seq_len, gen)
    loss = sum(float(model(*next(it))) for _ in range(batches)) / batches
    model.train()
    return loss


def run(method: str, cfg: TrainConfig, progress: bool = True) -> RunResult:
    """Train with one method in this process and measure it."""
    from tqdm import tqdm

    from weightkit.data import batches as make_batches
    from weightkit.data import byte_corpus

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val = byte_corpus()
    model = prepare_model(method, cfg)
    opt = build_optimizer(method, model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    it = make_batches(train, cfg.batch_size, cfg.seq_len, gen)
    result = RunResult(method)
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=f"{method:>8}", disable=not progress, leave=True)
    for step in bar:
        x, y = next(it)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            result.steps.append(step)
            result.train_loss.append(float(loss))
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"{method}: loss became {float(loss)} at step {step}")
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / result.seconds
    result.val_loss = evaluate(model, val, cfg)
    result.optimizer_state_bytes = tensor_bytes(opt.state)
    result.weight_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def _child(method: str, cfg_dict: Dict, queue) -> None:
    try:
        queue.put(("ok", asdict(run(method, TrainConfig(**cfg_dict)))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def compare(methods=METHODS, cfg: Optional[TrainConfig] = None, isolate: bool = True) -> List[RunResult]:
    """Run each method (each in a fresh process when ``isolate``) and return their results."""
    cfg = cfg or TrainConfig()
    results = []
    for method in methods:
        if not isolate:
            results.append(run(method, cfg))
            continue
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, asdict(cfg), queue))
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"training with {method} failed: {payload}")
        results.append(RunResult(**payload))
    return results


def report(results: List[RunResult]) -> str:
    base = next((r for r in results if r.method == "adamw"), None)
    lines = ["| method | final train loss | val loss | tokens/s | peak RSS MB | optimizer state MB | state vs AdamW | weights MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.optimizer_state_bytes / base.optimizer_state_bytes:.1%}" if base and base.optimizer_state_bytes else "-"
        lines.append(f"| {r.method} | {r.train_loss[-1]:.3f} | {r.val_loss:.3f} | {r.tokens_per_s:,.0f} | {r.peak_rss_mb:,.0f} | "
                     f"{r.optimizer_state_bytes / 1e6:.2f} | {ratio} | {r.weight_bytes / 1e6:.2f} |")
    return "\n".join(lines)


def plot(results: List[RunResult], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(r.steps, r.train_loss, label=f"{r.method} (val {r.val_loss:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title("TinyLlama on pydoc topics: AdamW vs GaLore vs Q-GaLore")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save(results: List[RunResult], cfg: TrainConfig, path: str) -> None:
    import platform

    payload = {"config": asdict(cfg), "results": [asdict(r) for r in results],
               "torch": torch.__version__, "device": f"{platform.machine()} CPU x{torch.get_num_threads()}",
               "date": time.strftime("%Y-%m-%d")}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
