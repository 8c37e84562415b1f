"""The GPU measurements of the open performance issues, side by side with the baselines a GPU user has, in one run.

    python -m bench.gpu_report [--out bench/results/<gpu>-<date>-gpu-report.json] [--budget 100] [--only quant,...]
                               [--section-budget quant=40,...]

Each row times one call three ways, after a warm-up call that compiles and autotunes:

* ``ms``: the call time, the median of CUDA-event timings of calls back to back (``triton.testing.do_bench``): what
  a loop of eager calls gets, the larger of the host's and the GPU's time per call;
* ``host_ms``: the host's time per call (host clock over a few calls launched back to back, no sync in between):
  Python, dispatch and launches; a call that syncs shows its GPU time here too;
* ``kernel_ms``: the GPU's time per call without the host: the calls captured in one CUDA graph and replayed
  (``graph_error`` says why, where a call cannot be captured; ``graph=False`` rows, e.g. optimizer steps that sync
  by design, skip it). Where the host's time is under a quarter of the call time, the GPU bounds the call already
  and ``kernel_ms`` is ``ms`` (``kernel_ms_from`` says so): no replay, to spend the budget on more rows.

GB/s, % of the copy bandwidth and TFLOP/s come from ``kernel_ms`` where measured (``rate_basis``), else from ``ms``;
``speedup_vs_base`` (base ms / this ms, > 1 = faster than the row named by ``vs``) compares call times,
``kernel_speedup_vs_base`` kernel times and ``host_speedup_vs_base`` host times. Ceilings measured in the same run: device copy bandwidth (bytes read +
written) and the matrix rates.

Sections, in the order they run by default (value first): ceilings, quant (issue 15: Int8Linear, INT4 matmul,
stochastic rounding), kernels (decode calls: call time, kernel time from a CUDA-graph replay, and the CUDA kernels
each call runs), galore (issue 16: optimizer steps, refresh), memoryformer (issue 26 item 1: MemoryLinear vs bf16
nn.Linear, fwd+bwd per table-gradient method), dictionary (issue 26 item 2: DictLinear in bf16, triton vs cuda vs
nn.Linear), auto (the measured backend choice per regime at those shapes), host (per-call host overhead of eager
layers vs nn.Linear, issue 14). After each section, the configs the Triton autotuners chose; at the end, every
Triton kernel compiled, with its registers and spills as loaded (section "compiled").

Budgets hold, autotuning and compiles included: each section has its share of ``--budget`` (SECTION_BUDGETS,
scaled to the sections asked for; ``--section-budget`` sets one outright); a row that would start past it is skipped
and listed with its reason, and a row still running at the section's deadline is cut by an alarm (SIGALRM) and
recorded as cut. A row that fails records its error and the run goes on; a row whose optional peer is missing
(bitsandbytes, galore-torch) is skipped with the reason. The JSON (``--out``) is rewritten after every row (written
to a temporary file, then renamed), so a run killed from outside leaves every row measured so far; ``complete`` is
true only when the run ended by itself, and ``sections`` says per section what happened. Needs a CUDA device
(``--device cpu`` runs the bookkeeping alone, for the tests: its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
import warnings

import torch

from weightkit.backend import allow_tf32 as _tf32

DEV = "cuda"  # where the sections allocate (the CPU only in the tests of the bookkeeping)
ROWS: list = []
SKIPPED: list = []  # "section/name: why" of each row not measured
SECTION_STATUS: dict = {}  # section -> status, budget_s, seconds, rows
_META: dict = {}
_OUT = [None]
_COMPLETE = [False]
_DEADLINE = [float("inf")]  # absolute time: the whole report (--budget)
_SECTION_DEADLINE = [float("inf")]  # absolute time: the section running
COPY_BW = [None]

# Seconds per section, in the default order (value first). They are shares: a run gives the sections it runs
# --budget (less the start-up), in these proportions (make gpu-check: 100 s for all seven, ~97 s after start-up).
SECTION_BUDGETS = {"ceilings": 6, "quant": 30, "kernels": 15, "galore": 12, "memoryformer": 10, "dictionary": 10,
                   "auto": 14, "host": 5}


class BudgetExceeded(BaseException):
    """Raised by the section alarm at the section's deadline (a BaseException, so that no ``except Exception`` in a
    row or a library swallows it)."""


_WRITING = [False]
_PENDING_CUT = [False]


def _on_alarm(signum, frame):
    if _WRITING[0]:  # never leave the JSON half-written: cut right after the write
        _PENDING_CUT[0] = True
        return
    raise BudgetExceeded("the section's time budget ran out")


def _arm(deadline: float) -> None:
    # then every half second: a cut that a library turned into another error (an exception raised while unwinding
    # replaces it) comes again until the section ends
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 1e-3), 0.5)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    _PENDING_CUT[0] = False


def write() -> None:
    """The report so far to ``--out``: a temporary file renamed over it, so a kill never leaves half a file."""
    if _OUT[0] is None:
        return
    _WRITING[0] = True
    try:
        tmp = _OUT[0] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=_META, complete=_COMPLETE[0], copy_GBps=COPY_BW[0], sections=SECTION_STATUS,
                           rows=ROWS, skipped=SKIPPED), f, indent=1, default=str)
        os.replace(tmp, _OUT[0])
    finally:
        _WRITING[0] = False
    if _PENDING_CUT[0]:
        _PENDING_CUT[0] = False
        raise BudgetExceeded("the section's time budget ran out")


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _bench(fn, warmup=5, rep=25):
    """Median call time in ms (CUDA events; on the CPU, for the tests, the host clock)."""
    if DEV != "cuda":  # one call: the CPU runs are tests of the bookkeeping, their times mean nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _host_ms(fn, calls):
    """Host time per call: ``calls`` calls launched back to back with no sync in between (the GPU runs behind when
    its part is the longer one), best of three rounds."""
    best = float("inf")
    for _ in range(3 if DEV == "cuda" else 1):
        _sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    _sync()
    return best / calls * 1e3


def _graph_ms(fn, calls=20):
    """Kernel time per call without the host: ``calls`` calls captured in one CUDA graph, replayed (do_bench)."""
    caller = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(caller)
    with torch.cuda.stream(side):  # warm-up on a side stream (allocator, lazy handles) outside the capture
        fn()
    caller.wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return _bench(graph.replay) / calls
    finally:
        # a capture that failed can leave its stream current (torch.cuda.graph's exit raises before restoring it)
        torch.cuda.set_stream(caller)
        del graph


class _Optional(Exception):
    """A row's peer (bitsandbytes, galore-torch) is not installed: the row is skipped, with the reason."""


def _skip(section, name, why):
    SKIPPED.append(f"{section}/{name}: {why}")
    print(f"  {section:<10} {name:<58} skipped: {why}", flush=True)
    write()


def row(section, name, fn=None, *, setup=None, ms=None, graph=True, bytes=None, flops=None, base=None,  # noqa: A002
        **info):
    """Time ``fn`` (or ``setup()``'s result, built only when the row runs; or take ``ms``) and record a row.

    ``base`` names an earlier row of the section to compare to; ``graph=False`` skips the CUDA-graph replay (calls
    that sync or allocate on the host by design), ``graph="always"`` replays even where the GPU bounds the call. A
    ``setup`` that raises ImportError (an optional peer is missing) skips the row with the reason; past the budget
    the row is skipped before ``setup`` runs."""
    now = time.time()
    if now > _DEADLINE[0]:
        _skip(section, name, "past the report's time budget")
        return None
    if now > _SECTION_DEADLINE[0]:
        _skip(section, name, "past the section's time budget")
        return None
    rec = dict(section=section, name=name, **info)
    try:
        if setup is not None:
            try:
                fn = setup()
            except ImportError as exc:
                raise _Optional(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        if ms is None:
            fn()  # compile / autotune / allocate outside the timing
            _sync()
            ms = _bench(fn)
            rec["host_ms"] = _host_ms(fn, max(1, min(20, int(5.0 / max(ms, 1e-3)))) if DEV == "cuda" else 1)
            if graph is True and DEV == "cuda" and rec["host_ms"] < 0.25 * ms:
                # the GPU bounds the call time already: the replay would measure the same (and cost time)
                rec["kernel_ms"], rec["kernel_ms_from"] = ms, "ms (host time < 25% of it)"
            elif graph and DEV == "cuda":
                try:
                    rec["kernel_ms"] = _graph_ms(fn, calls=max(1, min(20, int(1.0 / max(ms, 1e-3)))))
                except Exception as exc:  # noqa: BLE001 - capture fails on a host sync or a CPU-side step
                    rec["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rec["ms"] = ms
        _rates(rec, section, bytes, flops, base)
    except _Optional as exc:
        _skip(section, name, str(exc))
        return None
    except BudgetExceeded:
        rec["error"] = "cut: the section's time budget ran out during this row"
        ROWS.append(rec)
        _print(rec)
        write()
        raise
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the report
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        traceback.print_exc(limit=3)
    ROWS.append(rec)
    _print(rec)
    write()
    return rec.get("ms")


def _rates(rec, section, nbytes, flops, base):
    ms = rec.get("kernel_ms", rec["ms"])
    rec["rate_basis"] = "kernel_ms" if "kernel_ms" in rec else "ms"
    if nbytes is not None:
        rec["GB/s"] = nbytes / ms / 1e6
        if COPY_BW[0]:
            rec["pct_copy_bw"] = 100 * rec["GB/s"] / COPY_BW[0]
    if flops is not None:
        rec["TFLOP/s"] = flops / ms / 1e9
    if base is not None:
        ref = next((r for r in ROWS if r["section"] == section and r["name"] == base and "ms" in r), None)
        if ref is not None:
            rec["vs"] = base
            rec["speedup_vs_base"] = ref["ms"] / rec["ms"]
            if "kernel_ms" in ref and "kernel_ms" in rec:
                rec["kernel_speedup_vs_base"] = ref["kernel_ms"] / rec["kernel_ms"]
            if "host_ms" in ref and "host_ms" in rec:
                rec["host_speedup_vs_base"] = ref["host_ms"] / rec["host_ms"]


def _print(r):
    if "error" in r:
        print(f"  {r['section']:<10} {r['name']:<58} ERROR {r['error']}", flush=True)
        return
    if r.get("ms") is None:  # a record without a time (an error figure, a sync count, a check's verdict)
        fields = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                           if k not in ("section", "name"))
        print(f"  {r['section']:<10} {r['name']:<58} {fields[:160]}", flush=True)
        return
    times = f"{r['ms']:9.4f} ms"
    if "host_ms" in r:
        times += f"  host {r['host_ms']:8.4f}"
    if "kernel_ms" in r:
        times += f"  kernel {r['kernel_ms']:8.4f}"
    extra = []
    for key, fmt in (("GB/s", "{:.0f} GB/s"), ("pct_copy_bw", "{:.0f}% bw"), ("TFLOP/s", "{:.1f} TF/s"),
                     ("speedup_vs_base", "x{:.2f} vs base"), ("kernel_speedup_vs_base", "(kernel x{:.2f})"),
                     ("host_speedup_vs_base", "(host x{:.2f})")):
        if key in r:
            extra.append(fmt.format(r[key]))
    print(f"  {r['section']:<10} {r['name']:<58} {times}  {'  '.join(extra)}", flush=True)


def _wk_backend(name):
    from weightkit import use_backend

    return use_backend(name)


# ----------------------------------------------------------------------------------------------------------------
# The sizes of the sections (the issues' shapes); the tests of the bookkeeping shrink them to run every section on
# the CPU. COPY_ELEMS: fp32 elements of the copy (1 GiB); CEIL: the ceilings' matrix side; QUANT_D, QUANT_TOKENS: the quant section's 8192^2 layer and token
# counts; PROJ: P^T G with P (m x r), G (m x n); MEM_D, MEM_TOKENS: MemoryLinear; DICT (d, k, s), DICT_TOKENS:
# DictLinear in bf16 (k, s: 30% of the bf16 bytes removed); KERNELS_D, KERNELS_TOKENS: the kernels section's two layer sizes and their token counts.
COPY_ELEMS, CEIL = 1 << 28, 8192
QUANT_D, QUANT_TOKENS = 8192, (1, 16, 256, 4096)
PROJ = (4096, 1024, 4096)
MEM_D, MEM_TOKENS = 4096, (1, 16, 1024)
DICT, DICT_TOKENS = (4096, 1796, 898), (1, 16, 256, 4096)  # d, k, s: dictionary_size(4096, 4096, 0.3, value_bytes=2)
KERNELS_D, KERNELS_TOKENS = (8192, 4096), ((1, 16, 256), (1, 16))
QGALORE_FUSED_SIZES: dict = {}  # bench/qgalore_fused.measure's shapes, moment_shape (empty: its defaults, #24's)


# Q-GaLore's projections of a 350M model's float32 gradients (--model-size 350m: hidden 1024, MLP 2736, rank 256):
# bases below the INT4 kernels' TUNE_MIN_WEIGHT, so the shape rules' config runs. (G rows, G cols, side)
SMALL_PROJ, SMALL_RANK = ((2736, 1024, "right"), (1024, 2736, "left")), 256


def _float32_x_rows(Gt, packed, m, r, flops, base):
    """The Triton INT4 matmul of a float32 x without TF32 (torch's default): SPLIT_X (x's tiles in three bf16 parts,
    tensor cores; kernels/_shared.py, FLOAT32_X_SPLIT) against the FMA dots it replaced. At PROJ the tuner times
    both kinds (the row `P^T G int4_matmul triton`, its chosen config in the report's tuner lines); the `fma` row
    here times the FMA tiles alone. At a 350M model's projections (SMALL_PROJ) the shape rules' one config runs,
    SPLIT_X or FMA; both against cuBLAS's strict-fp32 GEMM of the dequantized basis."""
    from weightkit.kernels._shared import float32_x_split
    from weightkit.ops import int4

    if "triton" not in _backends(int4._MM):
        return
    with _tf32(False), _wk_backend("triton"), float32_x_split(False):
        row("quant", "P^T G int4_matmul triton fma", lambda: int4.int4_matmul(Gt, *packed, 64, (m, r), transpose=True),
            base=base, flops=flops)
    rank = SMALL_RANK
    for gm, gn, side in SMALL_PROJ:
        left = side == "left"
        g = torch.randn(gm, gn, device=DEV) * 1e-2
        shape = (gm, rank) if left else (rank, gn)
        p = torch.linalg.qr(torch.randn(max(shape), rank, device=DEV))[0]
        pq = int4.quantize_int4(p if left else p.T.contiguous(), 64)
        dense = int4.dequantize_int4(*pq, 64, shape)
        fl = 2 * gm * gn * rank
        name = f"projection {side} {gm}x{gn} r{rank} float32"
        with _tf32(False):
            row("quant", f"{name} strict fp32 GEMM", lambda: dense.T @ g if left else g @ dense.T, flops=fl)
            with _wk_backend("triton"):
                for split, kind in ((True, "split x"), (False, "fma")):
                    with float32_x_split(split):
                        row("quant", f"{name} int4_matmul triton {kind}",
                            lambda: int4.int4_matmul(g.T if left else g, *pq, 64, shape, transpose=left),
                            base=f"{name} strict fp32 GEMM", flops=fl)


def ceilings():
    n = COPY_ELEMS
    a = torch.randn(n, device=DEV)
    b = torch.empty_like(a)
    ms = row("ceilings", f"copy {n * 4 / 2**30:g} GiB (bytes read + written)", lambda: b.copy_(a),
             bytes=2 * a.numel() * 4, graph=False)
    if ms:
        COPY_BW[0] = 2 * a.numel() * 4 / ms / 1e6
    del a, b
    c = CEIL
    x = torch.randn(c, c, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(c, c, device=DEV, dtype=torch.bfloat16)
    row("ceilings", f"bf16 matmul {c}^3", lambda: x @ y, flops=2 * c**3, graph=False)
    x32, y32 = x.float(), y.float()
    with _tf32(False):
        row("ceilings", f"fp32 matmul {c}^3 (strict)", lambda: x32 @ y32, flops=2 * c**3, graph=False)
    with _tf32(True):
        row("ceilings", f"tf32 matmul {c}^3", lambda: x32 @ y32, flops=2 * c**3, graph=False)


def _backends(table):
    return [b for b in ("cuda", "triton") if table.why_not(b, torch.device(DEV)) is None]


def quant():
    """Issue 24 item 2 first: Int8Linear (8192^2 g128) and int4_matmul (g64) in bf16 at QUANT_TOKENS, each backend
    (triton: the fused kernels; cuda: dequantize to bf16 + cuBLAS) against bf16 nn.Linear, CUDA-graph replay at <= 16
    tokens; forward + backward at the most tokens; then stochastic rounding, the peers, P^T G and torch.compile."""
    from weightkit.nn import Int8Linear
    from weightkit.ops import int4, int8 as q

    d = QUANT_D
    lin = torch.nn.Linear(d, d, bias=False, device=DEV)
    lin_bf16 = torch.nn.Linear(d, d, bias=False, device=DEV, dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(lin, group_size=128)
    w = lin.weight.detach()
    packed, sc, zp = int4.quantize_int4(w, 64)
    peers = os.environ.get("QUANT_PEERS", "1") == "1"  # bitsandbytes / tinygemm rows (QUANT_PEERS=0 skips them)
    tiny = None
    try:  # torch's tinygemm int4 kernel (what torch/torchao users have), group 64
        if not peers:
            raise RuntimeError("skipped (QUANT_PEERS=0)")
        wq = torch.randint(0, 16, (d, d), dtype=torch.int32, device=DEV)
        wq = (wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8)
        packed_tiny = torch._convert_weight_to_int4pack(wq, 8)
        sz = torch.randn(d // 64, d, 2, device=DEV, dtype=torch.bfloat16)
        tiny = (packed_tiny, sz)
    except Exception as exc:  # noqa: BLE001
        print(f"  (tinygemm unavailable: {exc})")
    bnb_layers = {}
    try:  # bitsandbytes (carried to the GPU machine in .gpu-site)
        if not peers:
            raise RuntimeError("skipped (QUANT_PEERS=0)")
        import bitsandbytes as bnb

        l8 = bnb.nn.Linear8bitLt(d, d, bias=False, has_fp16_weights=False, threshold=0.0)
        l8.weight = bnb.nn.Int8Params(w.cpu().half(), requires_grad=False, has_fp16_weights=False)
        bnb_layers["bitsandbytes Linear8bitLt"] = l8.to(DEV)
        l4 = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(w.cpu().bfloat16(), requires_grad=False, quant_type="nf4")
        bnb_layers["bitsandbytes Linear4bit nf4"] = l4.to(DEV)
    except Exception as exc:  # noqa: BLE001
        print(f"  (bitsandbytes unavailable: {type(exc).__name__}: {exc})")
    int4_rows = os.environ.get("QUANT_INT4", "1") == "1"
    # Decode sizes (<= 16 tokens): the CUDA-graph replay always (kernel_ms: the issue's "graph replay" targets) beside
    # the eager call time (ms); triton = the fused kernels, cuda = dequantize to bf16 + cuBLAS.
    for tokens in QUANT_TOKENS:  # Int8Linear first (the issue's targets), then INT4 and the peers
        x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
        base = f"bf16 nn.Linear {tokens}x{d}x{d}"
        fl = 2 * tokens * d * d
        replay = "always" if tokens <= 16 else True
        with torch.no_grad():
            row("quant", base, lambda: lin_bf16(x), bytes=2 * d * d + 4 * tokens * d, flops=fl, graph=replay)
            for b in _backends(q._INT8_MM)[::-1]:
                with _wk_backend(b):
                    row("quant", f"Int8Linear g128 {b} {tokens} tok", lambda: layer(x), base=base,
                        bytes=d * d + d * d // 128 * 4 + 4 * tokens * d, flops=fl, graph=replay)
    # backward at the most tokens: bf16 nn.Linear (dgrad + wgrad) vs Int8Linear (dgrad + its weight's .grad)
    tokens = QUANT_TOKENS[-1]
    x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)

    def linear_backward():
        y = lin_bf16(x)
        return lambda: torch.autograd.grad(y, (x, lin_bf16.weight), g, retain_graph=True)

    row("quant", f"bf16 nn.Linear backward {tokens} tok", setup=linear_backward)
    base = f"bf16 nn.Linear fwd+bwd {tokens} tok"
    row("quant", base, lambda: torch.autograd.grad(lin_bf16(x), (x, lin_bf16.weight), g))
    for b in _backends(q._INT8_MM)[::-1]:
        def fb():
            layer.weight.grad = None
            with _wk_backend(b):
                yy = layer(x)
                torch.autograd.grad(yy, (x,), g)
        row("quant", f"Int8Linear fwd+bwd {b} {tokens} tok", fb, base=base)
    for tokens in QUANT_TOKENS:
        x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
        base = f"bf16 nn.Linear {tokens}x{d}x{d}"
        fl = 2 * tokens * d * d
        replay = "always" if tokens <= 16 else True
        with torch.no_grad():
            for b in (_backends(int4._MM)[::-1] if int4_rows else []):
                with _wk_backend(b):
                    row("quant", f"int4_matmul g64 {b} {tokens} tok",
                        lambda: int4.int4_matmul(x, packed, sc, zp, 64, (d, d)), base=base, flops=fl,
                        bytes=d * d // 2 + d * d // 64 * 5 + 4 * tokens * d, graph=replay)
            for bname, bl in bnb_layers.items():
                row("quant", f"{bname} {tokens} tok", lambda: bl(x), base=base, flops=fl)
            if tiny is not None:
                row("quant", f"torch _weight_int4pack_mm g64 {tokens} tok",
                    lambda: torch._weight_int4pack_mm(x, tiny[0], 64, tiny[1]), base=base, flops=fl)
    # INT4 forward + input gradient at the most tokens (the INT4 matrix is frozen: no weight gradient) vs bf16
    # nn.Linear's forward + input gradient
    tokens = QUANT_TOKENS[-1]
    x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
    base = f"bf16 nn.Linear fwd+dgrad {tokens} tok"
    row("quant", base, lambda: torch.autograd.grad(lin_bf16(x), (x,), g), flops=4 * tokens * d * d)
    for b in (_backends(int4._MM)[::-1] if int4_rows else []):
        def fb4():
            with _wk_backend(b):
                torch.autograd.grad(int4.int4_matmul(x, packed, sc, zp, 64, (d, d)), (x,), g)
        row("quant", f"int4_matmul fwd+dgrad g64 {b} {tokens} tok", fb4, base=base, flops=4 * tokens * d * d)
    # stochastic rounding and the fused write-back, d^2
    big = torch.randn(d, d, device=DEV)
    scale = q.absmax_scale(big, 128)
    for b in _backends(q._SR):
        with _wk_backend(b):
            row("quant", f"stochastic_round_int8 {d}^2 {b}", lambda: q.stochastic_round_int8(big, scale, 128, 1),
                bytes=big.numel() * 5 + scale.numel() * 4)
    delta = torch.randn(d, d, device=DEV) * 1e-3
    for b in _backends(q._SR_UPDATE):
        wq, s2 = q.stochastic_round_int8(big, scale, 128, 0), scale.clone()
        with _wk_backend(b):
            row("quant", f"int8_sr_update_ {d}^2 {b}", lambda: q.int8_sr_update_(wq, s2, delta, 128, seed=1),
                bytes=big.numel() * 6 + 2 * scale.numel() * 4)
    # quantize_int4 (#24: >= 70% of the copy bandwidth): fp32 read, packed bytes + scale + zero written
    for b in _backends(int4._QUANT):
        with _wk_backend(b):
            row("quant", f"quantize_int4 {d}^2 g64 {b}", lambda: int4.quantize_int4(big, 64),
                bytes=big.numel() * 4 + big.numel() // 2 + big.numel() // 64 * 5)
    # Q-GaLore projection P^T G: P m x r INT4 (4096 x 1024), G m x n (4096 x 4096)
    m, r, n = PROJ
    pfl = 2 * m * r * n
    P = torch.linalg.qr(torch.randn(m, r, device=DEV))[0]
    G = torch.randn(m, n, device=DEV)
    pk, ps, pz = int4.quantize_int4(P, 64)
    Pt = P.T.contiguous()
    with _tf32(False):
        row("quant", f"P^T G fp32 (strict) {m}x{r}x{n}", lambda: Pt @ G, flops=pfl)
    with _tf32(True):
        row("quant", "P^T G tf32", lambda: Pt @ G, flops=pfl)
    Pb, Gb = Pt.bfloat16(), G.bfloat16()
    row("quant", "P^T G bf16", lambda: Pb @ Gb, flops=pfl)
    Gt = G.T  # P^T G = (G^T P)^T: the INT4 op computes x @ W with x = G^T (n x m), W = P (m x r)
    for b in _backends(int4._MM):
        with _wk_backend(b):
            row("quant", f"P^T G int4_matmul {b}", lambda: int4.int4_matmul(Gt, pk, ps, pz, 64, (m, r),
                                                                           transpose=True),
                base=f"P^T G fp32 (strict) {m}x{r}x{n}", flops=pfl)
    _float32_x_rows(Gt, (pk, ps, pz), m, r, pfl, f"P^T G fp32 (strict) {m}x{r}x{n}")
    # torch.compile's int8 weight-only linear, group 128 (the way torchao's int8 weight-only runs): the issue's "never
    # slower than" baseline; last in the section, since each token count compiles (tens of seconds; the section's
    # budget cuts it; QUANT_COMPILE=0 skips it)
    if os.environ.get("QUANT_COMPILE", "1") == "1":
        wq8 = layer.weight.detach().view(d, d // 128, 128)
        s8 = layer.scale.detach().view(d, d // 128, 1)

        @torch.compile(dynamic=False)
        def compiled_int8(x):
            w = (wq8.to(x.dtype) * s8.to(x.dtype)).view(d, d)
            return torch.nn.functional.linear(x, w)

        for tokens in QUANT_TOKENS:
            x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
            with torch.no_grad():
                row("quant", f"torch.compile int8 weight-only g128 {tokens} tok", lambda: compiled_int8(x),
                    base=f"bf16 nn.Linear {tokens}x{d}x{d}", bytes=d * d + d * d // 128 * 4 + 4 * tokens * d,
                    flops=2 * tokens * d * d)


# (m, n) and rank of the optimizer-step rows; the refresh's and the Q-GaLore step's square size and rank (the tests
# of the bookkeeping shrink them)
GALORE_SHAPES = (((4096, 4096), 1024), ((4096, 11008), 512))
REFRESH_SHAPE = (4096, 1024)
QGALORE_SHAPE = (4096, 1024)


def galore():
    """Optimizer steps (no refresh: update_proj_gap 10**6, the first step builds the state outside the timing), a
    refresh, and a Q-GaLore step. Each optimizer is built only when its row runs (``setup``), so rows past the
    budget cost nothing, and a missing peer (bitsandbytes for the 8-bit moments, galore-torch) skips its rows with
    the reason instead of ending the section. Steps sync once by design (the NaN check of the gradients): no
    CUDA-graph replay; their host time shows that sync."""
    from weightkit import backend as wb
    from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit
    from weightkit.optim.projector import compute_basis

    try:
        import galore_torch
        no_galore_torch = None
    except Exception as exc:  # noqa: BLE001
        galore_torch, no_galore_torch = None, f"needs galore-torch ({type(exc).__name__}: {exc})"
    for (m, n), rank in GALORE_SHAPES:
        tag = f"{m}x{n} r{rank}"
        for tf32 in (False, True):
            with _tf32(tf32):
                mode = "tf32" if tf32 else "fp32"

                def make(kind, **extra):
                    p = torch.nn.Parameter(torch.randn(m, n, device=DEV) * 0.02)
                    p.grad = torch.randn(m, n, device=DEV)
                    group = {"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25,
                             "proj_type": "std", **extra}
                    if kind == "adamw":
                        opt = torch.optim.AdamW([p], lr=1e-3, fused=DEV == "cuda")
                    elif kind == "galore-torch":
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            opt = galore_torch.GaLoreAdamW([group], lr=1e-3)
                    else:  # randomized SVD: the first step's basis, outside the timing, in a tenth of the time
                        opt = kind([dict(group, svd="randomized")], lr=1e-3)
                    opt.step()  # projector + state
                    _sync()
                    return opt.step

                if not tf32:
                    row("galore", f"torch AdamW fused {tag}", setup=lambda: make("adamw"), graph=False)
                base = None
                if galore_torch is not None:
                    base = f"galore-torch {mode} {tag}"
                    row("galore", base, setup=lambda: make("galore-torch"), graph=False)
                else:
                    _skip("galore", f"galore-torch {mode} {tag}", no_galore_torch)
                for name in os.environ.get("GALORE_BACKENDS", "auto,cuda,triton").split(","):
                    with wb.use_backend(name):
                        row("galore", f"weightkit GaLoreAdamW {name} {mode} {tag}", setup=lambda: make(GaLoreAdamW),
                            base=base, graph=False)
                row("galore", f"weightkit GaLoreAdamW proj bf16 {mode} {tag}",
                    setup=lambda: make(GaLoreAdamW, proj_dtype="bfloat16"), base=base, graph=False)
                row("galore", f"weightkit GaLoreAdamW8bit {mode} {tag}", setup=lambda: make(GaLoreAdamW8bit),
                    base=base, graph=False)
    # refresh: a basis for a square gradient
    size, rank = REFRESH_SHAPE
    G = torch.randn(size, size, device=DEV)
    for svd in ("randomized", "exact"):
        row("galore", f"refresh {svd} {size}^2 r{rank}", lambda: compute_basis(G, rank, "left", svd), graph=False)
        if svd == "randomized":  # the default's small problem ('gram' on a GPU) against the SVD it replaced
            row("galore", f"refresh randomized small-svd {size}^2 r{rank}",
                lambda: compute_basis(G, rank, "left", svd, small_svd="svd"), graph=False)
    del G
    # Q-GaLore step on an Int8Linear weight
    from weightkit.nn import Int8Linear

    size, rank = QGALORE_SHAPE

    def qgalore_step():
        layer = Int8Linear.from_linear(torch.nn.Linear(size, size, bias=False, device=DEV))
        opt = QGaLoreAdamW8bit([{"params": [layer.weight], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25,
                                 "proj_type": "std"}], lr=1e-3)
        fg = torch.randn(size, size, device=DEV)

        def qstep():
            layer.weight.grad = fg.clone()
            opt.step()
        qstep()
        return qstep
    row("galore", f"weightkit QGaLoreAdamW8bit Int8Linear {size}^2 r{rank} (incl. grad copy)", setup=qgalore_step,
        graph=False)


def memoryformer():
    """Issue 26 item 1: MemoryLinear d -> d, tau 8 (512 tables x 256 rows x 4096 at d 4096), bf16 tables first (the
    targets), then fp32; forward at MEM_TOKENS against bf16 nn.Linear d^2 (kernel time by CUDA-graph replay at
    decode sizes) and F.embedding_bag (the PyTorch gather-reduce); forward+backward at the most tokens per backend
    with the table gradient by atomics, by sorted segments (table_grad_mode) and in deterministic mode."""
    from weightkit.nn import MemoryLinear
    from weightkit.ops import memoryformer as mem

    d, tau = MEM_D, 8
    K = d // tau
    lin = torch.nn.Linear(d, d, bias=False, device=DEV, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        layer = MemoryLinear(d, d, tau=tau, bias=False, device=DEV, dtype=dtype)
        tname = str(dtype).replace("torch.", "")
        flat = layer.tables.detach().reshape(K * 2**tau, d)
        for tokens in MEM_TOKENS:
            x = torch.randn(tokens, d, device=DEV, dtype=dtype)
            moved = tokens * K * d * layer.tables.element_size() + tokens * 2 * d * x.element_size()
            graph = "always" if tokens <= 16 else True  # decode: the kernel time is the target
            base = f"bf16 nn.Linear {d}^2 {tokens} tok"
            with torch.no_grad():
                if dtype == torch.bfloat16:
                    xb = x.bfloat16()
                    row("memoryformer", base, lambda: lin(xb), graph=graph, bytes=2 * d * d + 4 * tokens * d)
                for b in _backends(mem._FWD):
                    with _wk_backend(b):
                        row("memoryformer", f"MemoryLinear {tname} {b} {tokens} tok", lambda: layer(x), bytes=moved,
                            base=base, graph=graph)
                idx = torch.arange(K, device=DEV) * 2**tau + torch.randint(0, 2**tau, (tokens, K), device=DEV)
                p = torch.rand(tokens, K, device=DEV, dtype=dtype)
                row("memoryformer", f"F.embedding_bag sum {tname} {tokens} tok",
                    lambda: torch.nn.functional.embedding_bag(idx, flat, mode="sum", per_sample_weights=p),
                    bytes=moved, base=base, graph=graph)
        tokens = MEM_TOKENS[-1]
        x = torch.randn(tokens, d, device=DEV, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d, device=DEV, dtype=dtype)
        for b in _backends(mem._FWD):
            for mode, det in (("atomics", False), ("segments", False), ("segments", True)):
                def fb(b=b, mode=mode, det=det):
                    with _wk_backend(b):
                        prev = torch.are_deterministic_algorithms_enabled()
                        prev_mode = mem.set_table_grad_mode(mode)
                        torch.use_deterministic_algorithms(det, warn_only=True)
                        try:
                            torch.autograd.grad(layer(x), (x, layer.tables), g)
                        finally:
                            torch.use_deterministic_algorithms(prev)
                            mem.set_table_grad_mode(prev_mode)
                what = "deterministic" if det else f"table grad {mode}"
                row("memoryformer", f"MemoryLinear fwd+bwd {tname} {b} {tokens} tok {what}", fb,
                    base=None if mode == "atomics" else f"MemoryLinear fwd+bwd {tname} {b} {tokens} tok table grad "
                                                        "atomics")
    # the segment pass's sort alone: each backend's counting sort against torch.sort + searchsorted (what they replace)
    tokens, buckets = MEM_TOKENS[-1], 2**tau
    keys = torch.arange(K, device=DEV) * buckets + torch.randint(0, buckets, (tokens, K), device=DEV)
    base = f"segment sort torch.sort + searchsorted {tokens} tok x {K} tables x {buckets}"
    moved = tokens * K * 8 * 2  # the keys read, the order written (int64)

    def torch_sort():
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        return order, torch.searchsorted(sorted_keys, torch.arange(K * buckets + 1, device=DEV))

    backends = _backends(mem._BWD)
    if backends:
        row("memoryformer", base, torch_sort, bytes=moved)
    for b in backends:
        if b == "triton":
            from weightkit.kernels.memoryformer import sort_pairs

            keys32 = keys.int()
            fn = lambda: sort_pairs(keys32, buckets)  # noqa: E731
        else:
            from weightkit.backends.cuda import stream
            from weightkit.backends.cuda.memoryformer import _sort_pairs

            fn = lambda: _sort_pairs(keys, buckets, *stream(keys))  # noqa: E731
        row("memoryformer", f"segment sort counting {b} {tokens} tok x {K} tables x {buckets}", fn, bytes=moved,
            base=base)


def dictionary():
    """Issue #26 item 2: DictLinear 4096 -> 4096 in bf16 at 30% fewer bytes than the bf16 weight (k, s from
    dictionary_size(4096, 4096, 0.3, value_bytes=2): the bitmask format's exact bytes), each backend that runs
    dict_bitmask_matmul on CUDA -- triton (S decoded tile by tile in registers) and cuda (S^T decoded to dense bf16,
    then cuBLAS) -- against bf16 nn.Linear of the uncompressed shape. Targets: 1-16 tokens >= 1.2x faster than
    nn.Linear by kernel time (CUDA-graph replay, taken at 1 and 16 tokens whatever the host time); >= 256 tokens
    forward <= 1.3x nn.Linear; forward+backward at 4096 tokens <= 1.5x. Rows in that order (value first); the op alone
    (y = z S, z = x D given) beside each layer row. The Triton autotuning of each new token count is most of the
    section's time: the default budget may cut the last rows; a targeted call measures them all (STAGES=report
    REPORT_SECTIONS=dictionary REPORT_BUDGET=150 make gpu-check)."""
    from weightkit.nn import DictLinear
    from weightkit.ops import dictionary as dct

    d, k, s = DICT
    layer = DictLinear(d, d, k, s, bias=False, device=DEV, dtype=torch.bfloat16)
    lin = torch.nn.Linear(d, d, bias=False, device=DEV, dtype=torch.bfloat16)
    removed = layer.compression_ratio()
    stored = layer.stored_bytes()
    codes = stored - d * k * 2  # S alone: values, bitmask, word offsets
    tag = f"k{k} s{s} ({removed:.0%} fewer bytes)"
    backends = _backends(dct._BM_FWD)
    for tokens in DICT_TOKENS:
        x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
        z = x @ layer.dictionary.detach()
        linear = f"bf16 nn.Linear {tokens} tok"
        replay = "always" if tokens <= 16 else True  # the decode target is by kernel time
        fl = 2 * tokens * d * d
        with torch.no_grad():
            row("dictionary", linear, lambda: lin(x), graph=replay, bytes=2 * d * d + 4 * tokens * d, flops=fl)
            for b in backends:
                with _wk_backend(b):
                    row("dictionary", f"DictLinear bf16 {tag} {b} {tokens} tok", lambda: layer(x), graph=replay,
                        base=linear, bytes=stored + 4 * tokens * d, flops=fl)
                    row("dictionary", f"dict_bitmask_matmul bf16 {b} {tokens} tok (z S alone)",
                        lambda: dct.dict_bitmask_matmul(z, layer.values, layer.bitmask, layer.word_offsets),
                        graph=replay, bytes=codes + 2 * tokens * (k + d))
    tokens = DICT_TOKENS[-1]
    xg = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
    base = f"bf16 nn.Linear fwd+bwd {tokens} tok"
    row("dictionary", base, lambda: torch.autograd.grad(lin(xg), (xg, lin.weight), g), flops=6 * tokens * d * d)
    for b in backends:
        def fb():
            with _wk_backend(b):
                torch.autograd.grad(layer(xg), (xg, layer.dictionary, layer.values), g)
        row("dictionary", f"DictLinear bf16 {tag} fwd+bwd {b} {tokens} tok", fb, base=base,
            flops=6 * tokens * d * d)


def host():
    """Host time per eager call, tiny shapes (launch-bound): what Python + dispatch cost, vs nn.Linear. The layers
    and the calls are bench/test_bench_host.py's (4 tokens, 64 -> 64); each row's host_ms is the number (its ms is
    the call time, which the host bounds at this size)."""
    from bench.test_bench_host import D, LAYERS, _step

    lin = torch.nn.Linear(D, D, device=DEV)
    layers = {"nn.Linear": lin, **{name: build(lin) for name, (build, _) in LAYERS.items()}}
    for mode in ("inference", "training"):
        for name, layer in layers.items():
            base = f"nn.Linear {mode}" if name != "nn.Linear" else None
            row("host", f"{name} {mode}", _step(layer, mode), base=base, graph=mode == "inference")
    # One optimizer step of a LLaMA-style model of OPT_HOST_LAYERS layers (7 matrices and 2 norms each), 64 wide so
    # that the GPU's work is negligible: the Python and launch cost of a step, which the end-to-end rows of #24 / #25
    # (Q-GaLore's and GaLore's steps against fused AdamW's) pay per matrix at any width (the 350m model: 24 layers).
    name = f"{OPT_HOST_LAYERS} layers {OPT_HOST_WIDTH} wide"
    for method in ("adamw-fused", "galore", "qgalore"):
        row("host", f"optimizer step {method} {name}", setup=lambda m=method: _optimizer_step(m), graph=False,
            base=None if method == "adamw-fused" else f"optimizer step adamw-fused {name}",
            matrices=7 * OPT_HOST_LAYERS)


OPT_HOST_LAYERS, OPT_HOST_WIDTH = 6, 64


def _optimizer_step(method):
    """``opt.step`` of ``method`` (adamw-fused, galore, qgalore) over the host rows' model, its gradients set once (a
    step leaves them), past its first step (the bases' SVDs); nonfinite='raise' (the default: one host read a step)."""
    from weightkit.optim import GaLoreAdamW, QGaLoreAdamW8bit, param_groups
    from weightkit.train import TrainConfig, prepare_model

    cfg = TrainConfig(model_size="350m", dim=OPT_HOST_WIDTH, n_layers=OPT_HOST_LAYERS, seq_len=16)
    model = prepare_model("qgalore" if method == "qgalore" else "adamw", cfg, device=DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, device=DEV, generator=gen) * 1e-3).to(p.dtype)
    if method == "adamw-fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=DEV == "cuda" or None)
    else:
        groups = param_groups(model, rank=OPT_HOST_WIDTH // 4, update_proj_gap=10**6, scale=0.25)
        opt = (QGaLoreAdamW8bit(groups, lr=1e-3, min_8bit_size=1) if method == "qgalore"
               else GaLoreAdamW(groups, lr=1e-3))
    opt.step()  # the first step computes the bases
    return opt.step


def _kernel_breakdown(fn, calls=5):
    """[(kernel name, us per call, launches per call)] of the CUDA kernels one call of ``fn`` runs, by time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "self_cuda_time_total", 0)
        if dev_us > 0:
            out.append((evt.key[:90], dev_us / calls, evt.count / calls))
    return sorted(out, key=lambda t: -t[1])


def kernels():
    """Decode-size calls three ways: call time (do_bench, host included when it is the bottleneck; with the host's
    own time per call), kernel time without the host (CUDA-graph replay) and the CUDA kernels each call runs
    (profiler). Settles whether a slow decode row is the host, an extra kernel, or the kernel itself (issues 14, 15,
    17). Runs after quant, whose rows autotune the same 8192^2 shapes: the autotuners' choices are cached by then."""
    from weightkit.nn import Int8Linear, MemoryLinear
    from weightkit.ops import int4

    d, d_small = KERNELS_D
    lin = torch.nn.Linear(d, d, bias=False, device=DEV)
    lin_bf16 = torch.nn.Linear(d, d, bias=False, device=DEV, dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(lin, group_size=128)
    packed, sc, zp = int4.quantize_int4(lin.weight.detach(), 64)
    mem = MemoryLinear(d_small, d_small, tau=8, bias=False, device=DEV, dtype=torch.bfloat16)
    lin4k = torch.nn.Linear(d_small, d_small, bias=False, device=DEV, dtype=torch.bfloat16)
    cases = []
    for tokens in KERNELS_TOKENS[0]:
        x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
        cases += [(f"bf16 nn.Linear {d}^2 {tokens} tok", lambda x=x: lin_bf16(x)),
                  (f"Int8Linear g128 {d}^2 {tokens} tok", lambda x=x: layer(x))]
        if tokens == 1:
            cases.append((f"int4_matmul g64 {d}^2 {tokens} tok", lambda x=x: int4.int4_matmul(x, packed, sc, zp, 64,
                                                                                               (d, d))))
    for tokens in KERNELS_TOKENS[1]:
        x = torch.randn(tokens, d_small, device=DEV, dtype=torch.bfloat16)
        cases += [(f"bf16 nn.Linear {d_small}^2 {tokens} tok", lambda x=x: lin4k(x)),
                  (f"MemoryLinear bf16 {d_small}^2 {tokens} tok", lambda x=x: mem(x))]
    with torch.no_grad():
        for name, fn in cases:
            if row("kernels", name, fn, graph="always") is None:
                continue  # skipped (budget) or failed: no profile either
            if DEV != "cuda":
                continue
            try:
                ks = _kernel_breakdown(fn)
                ROWS.append(dict(section="kernels", name=f"{name} profile", kernels=ks))
                write()
                for kname, us, count in ks[:6]:
                    print(f"  kernels      {us:9.1f} us  x{count:g}  {kname}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  kernels    {name}: profiler failed: {type(exc).__name__}: {exc}", flush=True)


_AUTOTUNE_SEEN = set()


def autotune():
    """The configs the Triton autotuners in weightkit.kernels chose so far (recorded after each section)."""
    import importlib
    import pkgutil

    try:
        import triton

        import weightkit.kernels as kpkg
    except Exception:  # noqa: BLE001 - no triton: nothing was autotuned
        return
    for mod in pkgutil.iter_modules(kpkg.__path__):
        m = importlib.import_module(f"weightkit.kernels.{mod.name}")
        for attr, obj in vars(m).items():
            if isinstance(obj, triton.runtime.Autotuner):
                for key, cfg in list(getattr(obj, "cache", {}).items()):
                    if (mod.name, attr, str(key)) in _AUTOTUNE_SEEN:
                        continue
                    _AUTOTUNE_SEEN.add((mod.name, attr, str(key)))
                    ROWS.append(dict(section="autotune", name=f"{mod.name}.{attr}", key=str(key), config=str(cfg)))
                    short = tuple(k for k in key if not str(k).startswith("torch."))  # dtypes: in the JSON
                    print(f"  autotune   {mod.name}.{attr} {short} -> {cfg}", flush=True)
    write()


def compiled_kernels():
    """Every Triton kernel this process compiled (weightkit.kernels), with its registers, spills (bytes a thread) and
    shared memory as the GPU's driver loaded it: the configs the autotuners chose, at the report's shapes, with
    Triton's own specialization. One row per kernel name and config; recorded once, at the end."""
    import importlib
    import pkgutil

    try:
        from triton.runtime.jit import JITFunction

        import weightkit.kernels as kpkg
    except Exception:  # noqa: BLE001 - no triton
        return
    seen = set()
    for mod in pkgutil.iter_modules(kpkg.__path__):
        m = importlib.import_module(f"weightkit.kernels.{mod.name}")
        for obj in vars(m).values():
            for _ in range(3):  # an Autotuner / Heuristics wraps the JITFunction as .fn
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if not isinstance(obj, JITFunction) or id(obj) in seen:
                continue
            seen.add(id(obj))
            try:
                caches = [c[0] for c in getattr(obj, "device_caches", {}).values()]
            except Exception:  # noqa: BLE001 - another Triton's layout
                continue
            for cache in caches:
                for kernel in list(cache.values()):
                    try:
                        meta = kernel.metadata
                        consts = {}  # keyed by argument path, (index,), in Triton >= 3.3
                        for k, v in getattr(kernel.src, "constants", {}).items():
                            if isinstance(k, tuple) and len(k) == 1 and k[0] < len(obj.arg_names):
                                k = obj.arg_names[k[0]]
                            if isinstance(v, (int, bool, str)):
                                consts[str(k)] = v
                        ROWS.append(dict(section="compiled", name=obj.__name__, n_regs=getattr(kernel, "n_regs", None),
                                         n_spills=getattr(kernel, "n_spills", None), shared=meta.shared,
                                         num_warps=meta.num_warps, num_stages=meta.num_stages, constexprs=str(consts)))
                    except Exception:  # noqa: BLE001 - a kernel not loaded yet
                        continue
    spills = [r for r in ROWS if r.get("section") == "compiled" and (r.get("n_spills") or 0) > 0]
    lines = [f"\n    {r['name']} warps {r['num_warps']} spills {r['n_spills']} {r['constexprs'][:120]}" for r in spills]
    print(f"  compiled   {sum(r.get('section') == 'compiled' for r in ROWS)} Triton kernels, {len(spills)} spill "
          f"registers" + "".join(lines), flush=True)
    write()


def _rows_from(section, records):
    """Record rows measured by a bench module's own function (a list of dicts with a name and ms, or an error)."""
    for rec in records:
        rec = dict(rec)
        part = rec.pop("section", None)  # the bench module's own grouping
        name = rec.pop("name", None) or rec.pop("what", None) or " ".join(
            str(rec[k]) for k in ("shape", "backend", "precision", "who") if k in rec)
        name = f"{part}: {name}" if part else str(name)
        if rec.get("ms") is None:
            rec.pop("ms", None)
            ROWS.append(dict(section=section, name=name, **rec))
            _print(ROWS[-1])
            write()
        else:
            row(section, name, ms=rec.pop("ms"), **rec)


class _Streamed(list):
    """The row list handed to a bench module's own function: each row appended is recorded at once
    (:func:`_rows_from`, which writes the report), so that a stage stopped at its time limit keeps every row
    measured before it."""

    def __init__(self, section):
        super().__init__()
        self.section = section

    def append(self, rec):
        super().append(rec)
        _rows_from(self.section, [rec])


def galore_issue25():
    """Issue #25's table (bench/galore_issue25.py: steps against galore-torch at every precision, refreshes, host
    syncs per step, a compiled-kernel check, the write-back alone). Not in the default run: a second, targeted call
    (REPORT_SECTIONS=galore_issue25)."""
    from bench import galore_issue25 as g

    g.DEVICE = DEV
    g.table(_Streamed("galore_issue25"))


def qgalore_fused():
    """Issue #24's fused Q-GaLore ops (bench/qgalore_fused.py: the fused write-back at every precision against the
    composed and unfused paths, the one-pass 8-bit moments against bitsandbytes, the packed INT4 projection).
    Opt-in, as galore_issue25."""
    from bench import qgalore_fused as q

    q.measure(DEV, rows=_Streamed("qgalore_fused"), **QGALORE_FUSED_SIZES)


def compress():
    """Issue #26's compressor rows (bench/test_bench_compress.py: one 4096x11008 layer at 30% and MiniLM's 37
    layers on CUDA; the CPU MiniLM cosine is the 2-core run's recorded under bench/results/ for the same weights:
    the original, or the float16 copy that gpu_check carries in .gpu-minilm). Opt-in, as galore_issue25."""
    from bench.test_bench_compress import gpu_rows

    gpu_rows(row, skip=_skip)


def _auto_layer_rows(label, layer, d, token_counts, dtype, params):
    """The auto section's forward and fwd+bwd rows of one layer (gradients for the input and ``params``)."""
    for tokens in token_counts:
        x = torch.randn(tokens, d, device=DEV, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d, device=DEV, dtype=dtype)
        with torch.no_grad():
            row("auto", f"{label} {tokens} tok", lambda: layer(x))

        def fb():
            for p in layer.parameters():
                p.grad = None
            torch.autograd.grad(layer(x), (x, *params), g)
        row("auto", f"{label} fwd+bwd {tokens} tok", fb, graph=False)


def auto():
    """``auto``'s measured choice per regime (weightkit/backend.py, "Measured choice"; issues 24-26: "auto by
    measurement"). The layers and ops at the other sections' shapes run under ``auto`` with no recorded choice in
    force, so each call's regime is measured on its first call (the row's warm-up); the row then times what ``auto``
    runs. Each choice is then a row of its own (the chosen backend's ms and every candidate's; ``choice`` holds the
    entry). ``python -m bench.gpu_report --ship-auto-choices REPORT.json`` merges a GPU run's choices into
    ``weightkit/auto_choices.json``, the recorded choices shipped with the package (``tests/test_auto_choice.py``
    checks that file)."""
    from weightkit import backend as wb
    from weightkit.nn import DictLinear, Int8Linear, MemoryLinear
    from weightkit.nn.ksvd import dictionary_size
    from weightkit.ops import galore as gops, int4, int8 as q, qgalore as qops

    wb.reload_env()
    wb._RECORDED["loaded"] = {}  # measure everything, whatever is shipped
    wb._ENV["auto"] = "measure"
    try:
        d = QUANT_D
        layer = Int8Linear.from_linear(torch.nn.Linear(d, d, bias=False, device=DEV), group_size=128)
        _auto_layer_rows("Int8Linear g128 bf16", layer, d, QUANT_TOKENS, torch.bfloat16, ())
        packed, sc, zp = int4.quantize_int4(torch.randn(d, d, device=DEV), 64)
        for tokens in QUANT_TOKENS:
            x = torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16)
            with torch.no_grad():
                row("auto", f"int4_matmul g64 bf16 {tokens} tok",
                    lambda: int4.int4_matmul(x, packed, sc, zp, 64, (d, d)))
        big = torch.randn(d, d, device=DEV)
        scale = q.absmax_scale(big, 128)
        wq8, s8 = q.stochastic_round_int8(big, scale, 128, 0), scale.clone()
        delta = torch.randn(d, d, device=DEV) * 1e-3
        row("auto", f"stochastic_round_int8 {d}^2", lambda: q.stochastic_round_int8(big, scale, 128, 1))
        row("auto", f"int8_sr_update_ {d}^2", lambda: q.int8_sr_update_(wq8, s8, delta, 128, seed=1))
        row("auto", f"quantize_int4 g64 {d}^2", lambda: int4.quantize_int4(big, 64))
        row("auto", f"dequantize_int4 g64 {d}^2", lambda: int4.dequantize_int4(packed, sc, zp, 64, (d, d)))
        for dtype in (torch.bfloat16, torch.float32):
            mem = MemoryLinear(MEM_D, MEM_D, tau=8, bias=False, device=DEV, dtype=dtype)
            _auto_layer_rows(f"MemoryLinear {dtype}", mem, MEM_D, MEM_TOKENS, dtype, (mem.tables,))
        d = DICT[0]
        kb, sb = dictionary_size(d, d, 0.3, value_bytes=2)
        dl = DictLinear(d, d, kb, sb, bias=False, device=DEV, dtype=torch.bfloat16)
        _auto_layer_rows(f"DictLinear bf16 k{kb} s{sb}", dl, d, DICT_TOKENS, torch.bfloat16, (dl.values,))
        for (m, n), r in GALORE_SHAPES:
            weight = torch.randn(m, n, device=DEV)
            ortho = torch.linalg.qr(torch.randn(m, r, device=DEV))[0]
            low = torch.randn(r, n, device=DEV)
            ea, es = torch.zeros_like(low), torch.zeros_like(low)
            for tf32 in (False, True):
                with _tf32(tf32):
                    for pdt in (torch.float32, torch.bfloat16):
                        p = ortho.to(pdt)
                        row("auto", f"galore_adam_update_ {m}x{n} r{r} proj {pdt} {'tf32' if tf32 else 'strict'}",
                            lambda: gops.galore_adam_update_(weight, low, ea, es, p, True, step_size=1e-6))
            # the split projection's parts of a float32 / fp16 G: a column block of at most 4M values (strided)
            cols = max(1, min(n, (1 << 22) // m))
            for gdt in (torch.float32, torch.float16):
                gb = weight.to(gdt)[:, :cols]
                row("auto", f"bf16_parts {gdt} {m}x{cols} block of {m}x{n}", lambda: gops.bf16_parts(gb, 0))
        m, r = QGALORE_SHAPE
        wq = torch.randint(-127, 128, (m, m), dtype=torch.int8, device=DEV)
        wsc = torch.rand(m * m // 128, device=DEV) * 1e-2 + 1e-3
        pq, ps, pz = int4.quantize_int4(torch.linalg.qr(torch.randn(m, r, device=DEV))[0], 64)
        upd = torch.randn(r, m, device=DEV)
        for prec in qops.PRECISIONS:
            row("auto", f"int8_sr_lowrank_update_ {m}^2 r{r} {prec}",
                lambda: qops.int8_sr_lowrank_update_(wq, wsc, pq, ps, pz, upd, 128, 64, True, alpha=1e-4,
                                                     precision=prec, seed=1))
        # galore_adam_update_'s write-back alone (GaLoreAdamW8bit: the direction from the one-pass 8-bit moments);
        # last, so that a short budget cuts these first
        for (m, n), r in GALORE_SHAPES:
            weight = torch.randn(m, n, device=DEV)
            ortho = torch.linalg.qr(torch.randn(m, r, device=DEV))[0]
            direction = torch.randn(r, n, device=DEV)
            for tf32 in (False, True):
                with _tf32(tf32):
                    for pdt in (torch.float32, torch.bfloat16):
                        p = ortho.to(pdt)
                        row("auto", f"lowrank_update_ {m}x{n} r{r} proj {pdt} {'tf32' if tf32 else 'strict'}",
                            lambda: gops.lowrank_update_(weight, direction, p, True, step_size=1e-6))
    finally:
        choices = wb.auto_choices()
        for c in choices:
            chosen = (c["ms"] or {}).get(c["backend"])
            rec = dict(section="auto", name=f"auto chose {c['backend']}: {c['op']} {c['regime']}", choice=c)
            if chosen is not None:
                rec["ms"] = chosen
            ROWS.append(rec)
            print(f"  auto       {rec['name']:<58} {c['how']} {c['ms']}", flush=True)
        write()
        wb.reload_env()


def ship_auto_choices(report: str, path: str) -> int:
    """Merge the measured choices of a report's ``auto`` rows into ``path`` (weightkit/auto_choices.json)."""
    from weightkit import backend as wb

    with open(report) as f:
        data = json.load(f)
    entries = [r["choice"] for r in data["rows"] if r.get("section") == "auto" and "choice" in r]
    meta = data.get("meta", {})
    note = f"{report}: {meta.get('device')}, {meta.get('date')}, torch {meta.get('torch')}, triton {meta.get('triton')}"
    return wb.save_auto_choices(path, note=note, entries=entries)


SECTIONS = {"ceilings": ceilings, "quant": quant, "kernels": kernels, "galore": galore, "memoryformer": memoryformer,
            "dictionary": dictionary, "auto": auto, "host": host,
            # opt-in (not in the default run): each fills a second, targeted call
            "galore_issue25": galore_issue25, "qgalore_fused": qgalore_fused, "compress": compress}


def section_budgets(sections, seconds, fixed=None):
    """Each section's seconds: ``fixed`` ones as given, the others ``seconds`` (less the fixed) in the proportions
    of SECTION_BUDGETS."""
    fixed = dict(fixed or {})
    shares = {s: SECTION_BUDGETS.get(s, 10) for s in sections if s not in fixed}
    left = max(seconds - sum(fixed.get(s, 0) for s in sections), 0.0)
    total = sum(shares.values()) or 1
    return {s: float(fixed[s]) if s in fixed else left * shares[s] / total for s in sections}


class CompileCounter:
    """Triton's compilation listener for one section: compiles (cache misses) and the seconds they took, summed over
    kernels (they overlap when a tuner compiles its configs in threads), and on-disk cache hits."""

    def __init__(self):
        self.compiles, self.hits, self.us = 0, 0, 0

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        if cache_hit:
            self.hits += 1
        else:
            self.compiles += 1
            self.us += times.total

    def status(self):
        return dict(compiles=self.compiles, compile_s=round(self.us / 1e6, 1), compile_cache_hits=self.hits)


def _listen_compiles(listener):
    """Make ``listener`` Triton's compilation listener; returns the one it replaces (None where this Triton has no
    knobs.compilation.listener: then nothing is counted)."""
    try:
        import triton

        knobs = triton.knobs.compilation
        old, knobs.listener = knobs.listener, listener
        return old
    except (ImportError, AttributeError):
        return None


def run_section(sec, budget_s):
    """Run one section under its budget: rows past the deadline are skipped, a row running at the deadline is cut
    (SIGALRM); the status goes to the JSON either way, with what Triton compiled meanwhile (CompileCounter)."""
    t0 = time.time()
    counter = CompileCounter()
    previous = _listen_compiles(counter)
    _SECTION_DEADLINE[0] = min(t0 + budget_s, _DEADLINE[0])
    SECTION_STATUS[sec] = dict(status="running", budget_s=round(budget_s, 1))
    n_rows, n_skipped = len(ROWS), len(SKIPPED)
    print(f"[{sec}] budget {budget_s:.3g} s", flush=True)
    status = "done"
    try:
        try:
            write()
            _arm(_SECTION_DEADLINE[0])
            SECTIONS[sec]()
        finally:
            _disarm()
    except BudgetExceeded:
        status = f"cut at its {budget_s:.3g} s budget"
        print(f"  {sec}: {status}", flush=True)
    except Exception:  # noqa: BLE001 - the next section still runs
        traceback.print_exc()
        ROWS.append(dict(section=sec, name="(section failed)", error=traceback.format_exc(limit=3)[-600:]))
        status = "failed"
    _SECTION_DEADLINE[0] = float("inf")
    _listen_compiles(previous)
    try:
        _sync()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001
        status += f"; the device failed after it: {type(exc).__name__}: {exc}"
    SECTION_STATUS[sec] = dict(status=status, budget_s=round(budget_s, 1), seconds=round(time.time() - t0, 1),
                               rows=len(ROWS) - n_rows, skipped=len(SKIPPED) - n_skipped, **counter.status())
    write()
    autotune()


def main(argv=None) -> int:
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="the JSON, rewritten after every row "
                    "(default bench/results/<gpu>-<date>-gpu-report.json)")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds for the whole report, start-up included")
    ap.add_argument("--only", default=",".join(SECTION_BUDGETS), help="sections, in the order to run them")
    ap.add_argument("--section-budget", default="", help="seconds for some sections outright, e.g. quant=60")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the bookkeeping alone, for the tests (timings mean nothing)")
    ap.add_argument("--ship-auto-choices", metavar="REPORT", default=None,
                    help="measure nothing: merge REPORT's auto-section choices into weightkit/auto_choices.json")
    args = ap.parse_args(argv)
    if args.ship_auto_choices:
        from weightkit import backend as wb

        n = ship_auto_choices(args.ship_auto_choices, wb.RECORDED_FILE)
        print(f"gpu_report: {n} measured choices merged into {wb.RECORDED_FILE}")
        return 0
    t_start = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_report: needs a CUDA device", file=sys.stderr)
        return 2
    sections = [s for s in args.only.split(",") if s and s != "autotune"]  # autotune: recorded after each section
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"gpu_report: unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    DEV = args.device
    for state in (ROWS, SKIPPED, SECTION_STATUS, _META):
        state.clear()
    COPY_BW[0], _COMPLETE[0] = None, False
    _DEADLINE[0] = t_start + args.budget
    out = args.out
    if out is None:
        from weightkit.benchreport import device_tag

        out = f"bench/results/{device_tag()}-{time.strftime('%Y-%m-%d')}-gpu-report.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _OUT[0] = out

    import weightkit
    from weightkit import backend

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (bookkeeping test)"
    fixed = {k: float(v) for k, v in (kv.split("=") for kv in args.section_budget.split(",") if kv)}
    budgets = section_budgets(sections, _DEADLINE[0] - time.time(), fixed)
    _META.update(device=name, torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
                 weightkit=weightkit.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), backends=backend.status(),
                 sms=torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else None,
                 budget_s=args.budget, section_budgets_s={s: round(b, 1) for s, b in budgets.items()})
    for sec in sections:
        SECTION_STATUS[sec] = dict(status="not started", budget_s=round(budgets[sec], 1))
    print(f"gpu_report on {name}, torch {torch.__version__}, triton {triton_version}; budget {args.budget:.0f} s: "
          + ", ".join(f"{s} {b:.0f}" for s, b in budgets.items()), flush=True)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        write()
        for sec in sections:
            if time.time() >= _DEADLINE[0]:
                SECTION_STATUS[sec]["status"] = "skipped: the report's budget was spent"
                print(f"[{sec}] skipped: the report's budget was spent", flush=True)
                continue
            run_section(sec, budgets[sec])
        try:
            compiled_kernels()
        except Exception:  # noqa: BLE001 - a record, never a reason to lose the report
            traceback.print_exc()
        _COMPLETE[0] = True
        write()
    finally:
        signal.signal(signal.SIGALRM, previous)
    errors = sum("error" in r for r in ROWS)
    print(f"gpu_report: {len(ROWS)} rows, {errors} errors, {len(SKIPPED)} skipped, {time.time() - t_start:.0f} s -> "
          f"{out}", flush=True)
    for sec, st in SECTION_STATUS.items():
        print(f"  {sec:<12} {st['status']} ({st.get('seconds', 0)} of {st['budget_s']} s, {st.get('rows', 0)} rows, "
              f"{st.get('skipped', 0)} skipped, {st.get('compiles', 0)} Triton compiles: {st.get('compile_s', 0)} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
