"""The GPU measurements of the open performance issues, side by side with the baselines a GPU user has, in one run.

    python -m bench.gpu_report [--out bench/results/<gpu>-<date>-gpu-report.json] [--budget 120] [--only quant,...]

Every time is the median of CUDA-event timings (``triton.testing.do_bench``), after a warm-up that compiles and
autotunes. Ceilings measured in the same run: device copy bandwidth (bytes read + written) and the bf16 matrix
rate. Each row: name, ms, and where meaningful GB/s, % of the copy bandwidth, TFLOP/s and the ratio to the row's
baseline (``vs``: baseline ms / this ms, > 1 = faster than the baseline). A row that fails records its error and
the run goes on; rows past the time budget are skipped (and listed). Sections: ceilings, quant (issue 15: Int8Linear,
INT4 matmul, stochastic rounding), galore (issue 16: optimizer steps, refresh), memory and dictionary (issue 17),
host (per-call host overhead of eager layers vs nn.Linear, issue 14), kernels (decode calls: call time, kernel
time without the host from a CUDA-graph replay, and the CUDA kernels per call), autotune (configs the Triton autotuners
chose). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch

ROWS = []
SKIPPED = []
_T0 = time.time()
_BUDGET = [1e9]
_SECTION_DEADLINE = [1e18]  # absolute time; set per section from --section-budget
COPY_BW = [None]


def _bench(fn, warmup=10, rep=40):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def row(section, name, fn=None, *, ms=None, bytes=None, flops=None, base=None, **info):  # noqa: A002
    """Time ``fn`` (or take ``ms``) and record a row; ``base`` names an earlier row of the section to compare to."""
    if time.time() - _T0 > _BUDGET[0] or time.time() > _SECTION_DEADLINE[0]:
        SKIPPED.append(f"{section}/{name}")
        return None
    rec = dict(section=section, name=name, **info)
    try:
        if ms is None:
            fn()  # compile / autotune / allocate outside the timing
            torch.cuda.synchronize()
            ms = _bench(fn)
        rec["ms"] = ms
        if bytes is not None:
            rec["GB/s"] = bytes / ms / 1e6
            if COPY_BW[0]:
                rec["pct_copy_bw"] = 100 * rec["GB/s"] / COPY_BW[0]
        if flops is not None:
            rec["TFLOP/s"] = flops / ms / 1e9
        if base is not None:
            ref = next((r for r in ROWS if r["section"] == section and r["name"] == base and "ms" in r), None)
            if ref is not None:
                rec["vs"] = base
                rec["speedup_vs_base"] = ref["ms"] / ms
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the report
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        traceback.print_exc(limit=3)
    ROWS.append(rec)
    _print(rec)
    return rec.get("ms")


def _print(r):
    if "error" in r:
        print(f"  {r['section']:<10} {r['name']:<58} ERROR {r['error']}", flush=True)
        return
    extra = []
    for key, fmt in (("GB/s", "{:.0f} GB/s"), ("pct_copy_bw", "{:.0f}% bw"), ("TFLOP/s", "{:.1f} TF/s"),
                     ("speedup_vs_base", "x{:.2f} vs base")):
        if key in r:
            extra.append(fmt.format(r[key]))
    print(f"  {r['section']:<10} {r['name']:<58} {r['ms']:9.4f} ms  {'  '.join(extra)}", flush=True)


def _wk_backend(name):
    from weightkit import use_backend

    return use_backend(name)


# ----------------------------------------------------------------------------------------------------------------

def ceilings():
    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    ms = row("ceilings", "copy 1 GiB (bytes read + written)", lambda: b.copy_(a), bytes=2 * a.numel() * 4)
    if ms:
        COPY_BW[0] = 2 * a.numel() * 4 / ms / 1e6
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    row("ceilings", "bf16 matmul 8192^3", lambda: x @ y, flops=2 * 8192**3)
    x32, y32 = x.float(), y.float()
    with _tf32(False):
        row("ceilings", "fp32 matmul 8192^3 (strict)", lambda: x32 @ y32, flops=2 * 8192**3)
    with _tf32(True):
        row("ceilings", "tf32 matmul 8192^3", lambda: x32 @ y32, flops=2 * 8192**3)


class _tf32:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def _backends(table):
    return [b for b in ("cuda", "triton") if table.why_not(b, torch.device("cuda")) is None]


def quant():
    from weightkit.nn import Int8Linear
    from weightkit.ops import int4, int8 as q

    d = 8192
    lin = torch.nn.Linear(d, d, bias=False, device="cuda")
    lin_bf16 = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(lin, group_size=128)
    w = lin.weight.detach()
    packed, sc, zp = int4.quantize_int4(w, 64)
    peers = os.environ.get("QUANT_PEERS", "1") == "1"  # bitsandbytes / tinygemm rows (QUANT_PEERS=0 skips them)
    tiny = None
    try:  # torch's tinygemm int4 kernel (what torch/torchao users have), group 64
        if not peers:
            raise RuntimeError("skipped (QUANT_PEERS=0)")
        wq = torch.randint(0, 16, (d, d), dtype=torch.int32, device="cuda")
        wq = (wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8)
        packed_tiny = torch._convert_weight_to_int4pack(wq, 8)
        sz = torch.randn(d // 64, d, 2, device="cuda", dtype=torch.bfloat16)
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
        bnb_layers["bitsandbytes Linear8bitLt"] = l8.cuda()
        l4 = bnb.nn.Linear4bit(d, d, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        l4.weight = bnb.nn.Params4bit(w.cpu().bfloat16(), requires_grad=False, quant_type="nf4")
        bnb_layers["bitsandbytes Linear4bit nf4"] = l4.cuda()
    except Exception as exc:  # noqa: BLE001
        print(f"  (bitsandbytes unavailable: {type(exc).__name__}: {exc})")
    int4_rows = os.environ.get("QUANT_INT4", "1") == "1"
    for tokens in (1, 16, 256, 4096):  # Int8Linear first (the targets), then INT4 and the peers
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        base = f"bf16 nn.Linear {tokens}x{d}x{d}"
        fl = 2 * tokens * d * d
        with torch.no_grad():
            row("quant", base, lambda: lin_bf16(x), bytes=2 * d * d + 4 * tokens * d, flops=fl)
            for b in _backends(q._INT8_MM)[::-1]:
                with _wk_backend(b):
                    row("quant", f"Int8Linear g128 {b} {tokens} tok", lambda: layer(x), base=base,
                        bytes=d * d + d * d // 128 * 4 + 4 * tokens * d, flops=fl)
    # stochastic rounding and the fused write-back, 8192^2
    big = torch.randn(d, d, device="cuda")
    scale = q.absmax_scale(big, 128)
    for b in _backends(q._SR):
        with _wk_backend(b):
            row("quant", f"stochastic_round_int8 8192^2 {b}", lambda: q.stochastic_round_int8(big, scale, 128, 1),
                bytes=big.numel() * 5 + scale.numel() * 4)
    delta = torch.randn(d, d, device="cuda") * 1e-3
    for b in _backends(q._SR_UPDATE):
        wq, s2 = q.stochastic_round_int8(big, scale, 128, 0), scale.clone()
        with _wk_backend(b):
            row("quant", f"int8_sr_update_ 8192^2 {b}", lambda: q.int8_sr_update_(wq, s2, delta, 128, seed=1),
                bytes=big.numel() * 6 + 2 * scale.numel() * 4)
    # backward at 4096 tokens: bf16 nn.Linear (dgrad + wgrad) vs Int8Linear (dgrad + the fp32 float_grad)
    tokens = 4096
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    y = lin_bf16(x)
    row("quant", "bf16 nn.Linear backward 4096 tok", lambda: torch.autograd.grad(y, (x, lin_bf16.weight), g,
                                                                                 retain_graph=True))
    for b in _backends(q._INT8_MM)[::-1]:
        def fb():
            layer.weight.float_grad = None
            with _wk_backend(b):
                yy = layer(x)
                torch.autograd.grad(yy, (x,), g)
        row("quant", f"Int8Linear fwd+bwd {b} 4096 tok", fb)
    row("quant", "bf16 nn.Linear fwd+bwd 4096 tok",
        lambda: torch.autograd.grad(lin_bf16(x), (x, lin_bf16.weight), g))
    for tokens in (1, 16, 256, 4096):
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        base = f"bf16 nn.Linear {tokens}x{d}x{d}"
        fl = 2 * tokens * d * d
        with torch.no_grad():
            for b in (_backends(int4._MM)[::-1] if int4_rows else []):
                with _wk_backend(b):
                    row("quant", f"int4_matmul g64 {b} {tokens} tok",
                        lambda: int4.int4_matmul(x, packed, sc, zp, 64, (d, d)), base=base, flops=fl,
                        bytes=d * d // 2 + d * d // 64 * 5 + 4 * tokens * d)
            for bname, bl in bnb_layers.items():
                row("quant", f"{bname} {tokens} tok", lambda: bl(x), base=base, flops=fl)
            if tiny is not None:
                row("quant", f"torch _weight_int4pack_mm g64 {tokens} tok",
                    lambda: torch._weight_int4pack_mm(x, tiny[0], 64, tiny[1]), base=base, flops=fl)
    # torch.compile's int8 weight-only linear, group 128 (the way torchao's int8 weight-only runs): the issue's "never
    # slower than" baseline; last in the section, since each token count compiles (QUANT_COMPILE=0 skips it)
    if os.environ.get("QUANT_COMPILE", "1") == "1":
        wq8 = layer.weight.detach().view(d, d // 128, 128)
        s8 = layer.scale.detach().view(d, d // 128, 1)

        @torch.compile(dynamic=False)
        def compiled_int8(x):
            w = (wq8.to(x.dtype) * s8.to(x.dtype)).view(d, d)
            return torch.nn.functional.linear(x, w)

        for tokens in (1, 16, 256, 4096):
            x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                row("quant", f"torch.compile int8 weight-only g128 {tokens} tok", lambda: compiled_int8(x),
                    base=f"bf16 nn.Linear {tokens}x{d}x{d}", bytes=d * d + d * d // 128 * 4 + 4 * tokens * d,
                    flops=2 * tokens * d * d)
    # Q-GaLore projection P^T G: P 4096x1024 INT4, G 4096x4096
    P = torch.linalg.qr(torch.randn(4096, 1024, device="cuda"))[0]
    G = torch.randn(4096, 4096, device="cuda")
    pk, ps, pz = int4.quantize_int4(P, 64)
    Pt = P.T.contiguous()
    with _tf32(False):
        row("quant", "P^T G fp32 (strict) 4096x1024x4096", lambda: Pt @ G, flops=2 * 4096 * 1024 * 4096)
    with _tf32(True):
        row("quant", "P^T G tf32", lambda: Pt @ G, flops=2 * 4096 * 1024 * 4096)
    Pb, Gb = Pt.bfloat16(), G.bfloat16()
    row("quant", "P^T G bf16", lambda: Pb @ Gb, flops=2 * 4096 * 1024 * 4096)
    Gt = G.T  # P^T G = (G^T P)^T: the INT4 op computes x @ W with x = G^T (4096 x 4096), W = P (4096 x 1024)
    for b in _backends(int4._MATMUL if hasattr(int4, "_MATMUL") else int4._MM):
        with _wk_backend(b):
            row("quant", f"P^T G int4_matmul {b}", lambda: int4.int4_matmul(Gt, pk, ps, pz, 64, (4096, 1024),
                                                                           transpose=True),
                base="P^T G fp32 (strict) 4096x1024x4096", flops=2 * 4096 * 1024 * 4096)


def galore():
    from weightkit import backend as wb
    from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit
    from weightkit.optim.projector import compute_basis

    try:
        import galore_torch
    except Exception:  # noqa: BLE001
        galore_torch = None
    for (m, n), rank in (((4096, 4096), 1024), ((4096, 11008), 512)):
        tag = f"{m}x{n} r{rank}"
        for tf32 in (False, True):
            with _tf32(tf32):
                mode = "tf32" if tf32 else "fp32"

                def make(kind, **extra):
                    p = torch.nn.Parameter(torch.randn(m, n, device="cuda") * 0.02)
                    p.grad = torch.randn(m, n, device="cuda")
                    group = {"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25,
                             "proj_type": "std", **extra}
                    if kind == "adamw":
                        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
                    elif kind == "galore-torch":
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            opt = galore_torch.GaLoreAdamW([group], lr=1e-3)
                    else:
                        opt = kind([group], lr=1e-3)
                    opt.step()  # projector + state
                    torch.cuda.synchronize()
                    return opt

                if not tf32:
                    row("galore", f"torch AdamW fused {tag}", make("adamw").step)
                base = None
                if galore_torch is not None:
                    base = f"galore-torch {mode} {tag}"
                    row("galore", base, make("galore-torch").step)
                for name in os.environ.get("GALORE_BACKENDS", "auto,cuda,triton").split(","):
                    with wb.use_backend(name):
                        row("galore", f"weightkit GaLoreAdamW {name} {mode} {tag}", make(GaLoreAdamW).step, base=base)
                row("galore", f"weightkit GaLoreAdamW proj bf16 {mode} {tag}",
                    make(GaLoreAdamW, proj_dtype="bfloat16").step, base=base)
                row("galore", f"weightkit GaLoreAdamW8bit {mode} {tag}", make(GaLoreAdamW8bit).step, base=base)
    # refresh: a basis for 4096^2 at rank 1024
    G = torch.randn(4096, 4096, device="cuda")
    for svd in ("randomized", "exact"):
        row("galore", f"refresh {svd} 4096^2 r1024", lambda: compute_basis(G, 1024, "left", svd))
    # Q-GaLore step on an Int8Linear weight
    from weightkit.nn import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(4096, 4096, bias=False, device="cuda"))
    opt = QGaLoreAdamW8bit([{"params": [layer.weight], "rank": 1024, "update_proj_gap": 10**6, "scale": 0.25,
                             "proj_type": "std"}], lr=1e-3)
    fg = torch.randn(4096, 4096, device="cuda")

    def qstep():
        layer.weight.float_grad = fg.clone()
        opt.step()
    qstep()
    row("galore", "weightkit QGaLoreAdamW8bit Int8Linear 4096^2 r1024 (incl. grad copy)", qstep)


def memoryformer():
    from weightkit.nn import MemoryLinear
    from weightkit.ops import memoryformer as mem

    d, tau = 4096, 8
    K = d // tau
    for dtype in (torch.float32, torch.bfloat16):
        layer = MemoryLinear(d, d, tau=tau, bias=False, device="cuda", dtype=dtype)
        tname = str(dtype).replace("torch.", "")
        for tokens in (1, 16, 1024):
            x = torch.randn(tokens, d, device="cuda", dtype=dtype)
            moved = tokens * K * d * layer.tables.element_size() + tokens * 2 * d * x.element_size()
            base = None
            if dtype == torch.float32:
                base = f"F.embedding_bag sum fp32 {tokens} tok"
                idx = (torch.arange(K, device="cuda") * 256 + torch.randint(0, 256, (tokens, K), device="cuda"))
                p = torch.rand(tokens, K, device="cuda")
                flat = layer.tables.detach().reshape(K * 256, d)
                row("memoryformer", base, lambda: torch.nn.functional.embedding_bag(idx, flat, mode="sum",
                                                                              per_sample_weights=p), bytes=moved)
            lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
            xb = x.bfloat16()
            with torch.no_grad():
                row("memoryformer", f"bf16 nn.Linear {tokens} tok ({tname} row)", lambda: lin(xb))
                for b in _backends(mem._FWD):
                    with _wk_backend(b):
                        row("memoryformer", f"MemoryLinear {tname} {b} {tokens} tok", lambda: layer(x), bytes=moved,
                            base=base)
        x = torch.randn(1024, d, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(1024, d, device="cuda", dtype=dtype)
        for b in _backends(mem._FWD):
            for det in (False, True):
                def fb():
                    with _wk_backend(b):
                        prev = torch.are_deterministic_algorithms_enabled()
                        torch.use_deterministic_algorithms(det, warn_only=True)
                        try:
                            torch.autograd.grad(layer(x), (x, layer.tables), g)
                        finally:
                            torch.use_deterministic_algorithms(prev)
                row("memoryformer", f"MemoryLinear fwd+bwd {tname} {b} 1024 tok{' deterministic' if det else ''}", fb)


def dictionary():
    """Issue 17's DictLinear, 4096 -> 4096: the ELL gather (k 1638, s 819: 30% of the fp32 bytes removed) against
    cuSPARSE and dense bf16, and S in the bitmask format (dict_bitmask_matmul; DictLinear's forward), bf16 at the k, s
    that the bitmask budget gives at 30% of the bf16 bytes removed, and fp32, forward and forward+backward, against
    bf16 nn.Linear of the uncompressed shape."""
    from weightkit.nn import DictLinear
    from weightkit.nn.ksvd import dictionary_size
    from weightkit.ops import dictionary as dct

    d, k, s = 4096, 1638, 819
    layer = DictLinear(d, d, k, s, bias=False, device="cuda")
    dense_s = dct.bitmask_to_dense(layer.bitmask, layer.values.detach(), k)
    dense_bf = dense_s.bfloat16()
    sparse = dense_s.T.contiguous().to_sparse_csr()  # S^T (d_out x k), what cuSPARSE users would store
    kb, sb = dictionary_size(d, d, 0.3, value_bytes=2)
    layer_bf = DictLinear(d, d, kb, sb, bias=False, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    for tokens in (1, 16, 256, 4096):
        x = torch.randn(tokens, d, device="cuda")
        z = x @ layer.dictionary.detach()
        zb = z.bfloat16()
        xb = x.bfloat16()
        zbb = xb @ layer_bf.dictionary.detach()
        linear = f"bf16 nn.Linear {tokens} tok"
        with torch.no_grad():
            row("dictionary", linear, lambda: lin(xb))
            base = f"dense bf16 Z@S {tokens} tok"
            row("dictionary", base, lambda: zb @ dense_bf)
            if sparse is not None:
                zt = z.T.contiguous()
                row("dictionary", f"cuSPARSE CSR y^T = S^T Z^T fp32 {tokens} tok", lambda: sparse @ zt, base=base)
            for b in _backends(dct._BM_FWD):
                with _wk_backend(b):
                    row("dictionary", f"dict_bitmask_matmul fp32 {b} {tokens} tok",
                        lambda: dct.dict_bitmask_matmul(z, layer.values, layer.bitmask, layer.word_offsets), base=base)
                    row("dictionary", f"dict_bitmask_matmul bf16 k{kb} s{sb} {b} {tokens} tok",
                        lambda: dct.dict_bitmask_matmul(zbb, layer_bf.values, layer_bf.bitmask, layer_bf.word_offsets),
                        base=base, bytes=layer_bf.stored_bytes() - d * kb * 2)
                    row("dictionary", f"DictLinear fp32 {b} {tokens} tok (incl. x@D)", lambda: layer(x))
                    row("dictionary", f"DictLinear bf16 k{kb} s{sb} {b} {tokens} tok (incl. x@D)",
                        lambda: layer_bf(xb), base=linear, bytes=layer_bf.stored_bytes())
        xg = xb.clone().requires_grad_(True)
        g = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        row("dictionary", f"bf16 nn.Linear fwd+bwd {tokens} tok",
            lambda: torch.autograd.grad(lin(xg), (xg, lin.weight), g))
        for b in _backends(dct._BM_FWD):
            def fb():
                with _wk_backend(b):
                    torch.autograd.grad(layer_bf(xg), (xg, layer_bf.dictionary, layer_bf.values), g)
            row("dictionary", f"DictLinear bf16 k{kb} s{sb} fwd+bwd {b} {tokens} tok", fb,
                base=f"bf16 nn.Linear fwd+bwd {tokens} tok")


def host():
    """Host time per eager call, tiny shapes (launch-bound): what Python + dispatch cost, vs nn.Linear. The layers
    and the calls are bench/test_bench_host.py's (4 tokens, 64 -> 64); here timed on the host clock per call."""
    from bench.test_bench_host import D, LAYERS, _step

    lin = torch.nn.Linear(D, D, device="cuda")
    layers = {"nn.Linear": lin, **{name: build(lin) for name, (build, _) in LAYERS.items()}}

    def host_us(fn, n=300):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e3

    for mode in ("inference", "training"):
        for name, layer in layers.items():
            base = f"nn.Linear {mode}" if name != "nn.Linear" else None
            row("host", f"{name} {mode}", ms=host_us(_step(layer, mode)), base=base)


def _graph_ms(fn, calls=20):
    """Kernel time per call without the host: ``calls`` calls captured in one CUDA graph, replayed (do_bench)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotune, compile, allocator) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _bench(graph.replay) / calls


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
    """Decode-size calls three ways: call time (do_bench, host included when it is the bottleneck), kernel time
    without the host (CUDA-graph replay) and the CUDA kernels each call runs (profiler). Settles whether a slow
    decode row is the host, an extra kernel, or the kernel itself (issues 14, 15, 17)."""
    from weightkit.nn import Int8Linear, MemoryLinear
    from weightkit.ops import int4

    d = 8192
    lin = torch.nn.Linear(d, d, bias=False, device="cuda")
    lin_bf16 = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(lin, group_size=128)
    packed, sc, zp = int4.quantize_int4(lin.weight.detach(), 64)
    mem = MemoryLinear(4096, 4096, tau=8, bias=False, device="cuda", dtype=torch.bfloat16)
    lin4k = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    cases = []
    for tokens in (1, 16, 256):
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        cases += [(f"bf16 nn.Linear 8192^2 {tokens} tok", lambda x=x: lin_bf16(x)),
                  (f"Int8Linear g128 8192^2 {tokens} tok", lambda x=x: layer(x))]
        if tokens == 1:
            cases.append((f"int4_matmul g64 8192^2 {tokens} tok", lambda x=x: int4.int4_matmul(x, packed, sc, zp, 64,
                                                                                               (d, d))))
    for tokens in (1, 16):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
        cases += [(f"bf16 nn.Linear 4096^2 {tokens} tok", lambda x=x: lin4k(x)),
                  (f"MemoryLinear bf16 4096^2 {tokens} tok", lambda x=x: mem(x))]
    with torch.no_grad():
        for name, fn in cases:
            call = row("kernels", f"{name} call", fn)
            try:
                gms = _graph_ms(fn)
            except Exception as exc:  # noqa: BLE001 - capture fails on a host sync or an allocation it cannot replay
                gms = None
                print(f"  kernels    {name}: CUDA graph capture failed: {type(exc).__name__}: {exc}", flush=True)
            if gms is not None:
                row("kernels", f"{name} graph", ms=gms, call_ms=call)
            try:
                ks = _kernel_breakdown(fn)
                ROWS.append(dict(section="kernels", name=f"{name} profile", kernels=ks))
                for kname, us, count in ks[:6]:
                    print(f"  kernels      {us:9.1f} us  x{count:g}  {kname}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  kernels    {name}: profiler failed: {type(exc).__name__}: {exc}", flush=True)


def autotune():
    """The config each Triton autotuner in weightkit.kernels chose (printed by make gpu-check)."""
    import importlib
    import pkgutil

    import triton

    import weightkit.kernels as kpkg

    for mod in pkgutil.iter_modules(kpkg.__path__):
        m = importlib.import_module(f"weightkit.kernels.{mod.name}")
        for attr, obj in vars(m).items():
            if isinstance(obj, triton.runtime.Autotuner):
                for key, cfg in getattr(obj, "cache", {}).items():
                    rec = dict(section="autotune", name=f"{mod.name}.{attr}", key=str(key), config=str(cfg))
                    ROWS.append(rec)
                    short = tuple(k for k in key if not str(k).startswith("torch."))  # dtypes: in the JSON
                    print(f"  autotune   {mod.name}.{attr} {short} -> {cfg}", flush=True)


SECTIONS = {"ceilings": ceilings, "host": host, "kernels": kernels, "quant": quant, "memoryformer": memoryformer,
            "dictionary": dictionary, "galore": galore, "autotune": autotune}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; rows past it are skipped")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--section-budget", default="", help="e.g. quant=60,memoryformer=40 (seconds per section)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report: needs a CUDA device", file=sys.stderr)
        return 2
    _BUDGET[0] = args.budget
    import triton

    import weightkit
    from weightkit import backend

    name = torch.cuda.get_device_name()
    meta = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                weightkit=weightkit.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), backends=backend.status(),
                sms=torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"gpu_report on {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for sec in args.only.split(","):
        if sec == "autotune":
            continue
        print(f"[{sec}]", flush=True)
        per = dict(kv.split("=") for kv in args.section_budget.split(",") if kv)
        _SECTION_DEADLINE[0] = time.time() + float(per[sec]) if sec in per else 1e18
        try:
            SECTIONS[sec]()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ROWS.append(dict(section=sec, name="(section failed)", error=traceback.format_exc(limit=2)[-400:]))
        torch.cuda.empty_cache()
    print("[autotune]", flush=True)
    autotune()
    out = args.out
    if out is None:
        from weightkit.benchreport import device_tag

        out = f"bench/results/{device_tag()}-{time.strftime('%Y-%m-%d')}-gpu-report.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, copy_GBps=COPY_BW[0], rows=ROWS, skipped=SKIPPED), f, indent=1)
    print(f"gpu_report: {len(ROWS)} rows, {sum('error' in r for r in ROWS)} errors, {len(SKIPPED)} skipped "
          f"(budget) -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
