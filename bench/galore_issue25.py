"""Issue #25's table in one GPU call (H100/H200): ``python -m bench.galore_issue25 [out.json]``, or ``table()`` from
bench/gpu_report.py (a list of row dicts).

Rows (each ratio against a baseline measured in the same run):

* step, 4096^2 r1024 and 4096x11008 r512: weightkit GaLoreAdamW (auto backend and each backend; nonfinite='raise',
  which reads the step's NaN/Inf flag once, and 'skip', which reads nothing) against galore-torch, with TF32 allowed
  (target >= 1.5x), with ``proj_dtype='bfloat16'`` against galore-torch with TF32 (target >= 2.5x), strict fp32
  against galore-torch strict (target >= 1.0x); GaLoreAdamW8bit against GaLoreAdamW (target <= 1.2x the time);
  and, at the first size, bf16 weights under strict fp32 against galore-torch's (no target: galore-torch projects
  with a bf16 basis, weightkit with its float32 basis in three bf16 parts);
* refresh 4096^2 r1024: randomized (Cholesky-QR on the GPU, fp32/TF32 and bf16 range finder; Householder for
  comparison; the small k x n problem by the default 'gram' eigendecomposition, and once by 'svd') and exact SVD
  (target <= 50 ms); then the refresh's phases alone (``refresh phase ...``): the range finder's five products,
  its five orthonormalizations (Cholesky-QR: three passes once, the shifted pass alone four times; or Householder
  five times) and the small problem ('svd' of the k x n B, or 'gram', the k x k B B^T's eigendecomposition in
  float64), so that one call says where a missed target's time goes; and a refresh of a gradient-like matrix
  (decaying spectrum) with the count of its Cholesky-QR fallbacks;
* host syncs in one steady-state step (torch.cuda.set_sync_debug_mode): <= 1 with 'raise', 0 with 'skip';
* a correctness smoke test of the compiled Triton kernel (bf16x6, tf32, bf16 operands; predicated) against the
  reference, since the interpreter does not compile it;
* the write-back op alone (``write-back ...``): the Triton kernel's float32 products without TF32 as six bf16
  tensor-core products ('bf16x6', the default) against its strict-fp32 FMA dots ('ieee'), 'tf32', the cuda
  backend's op (one bf16 GEMM over the six pairs) and, for a float32 weight, addmm_'s strict-fp32 GEMM alone, for a
  float32 and a bf16 weight (no target: which one auto should take);
* the projection of a float32 gradient alone (``projection ...``): G and P in three bf16 parts, six products in three
  cuBLAS bf16 GEMMs, against cuBLAS's strict-fp32 GEMM and TF32, time and error (no target: where the thresholds
  weightkit.optim.basis.SPLIT_FLOAT32_MIN_RANK and SPLIT_FLOAT32_MIN_FLOPS belong).

Step times: a loop of ``STEPS`` steps between two CUDA events after warm-up (what a training loop sees: host
launch overhead and the sync's stall included), median of ``REPEATS`` loops. Not measured here: the e2e 350m row
(``weightkit train --model-size 350m``, staggered refresh), which needs a training run.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
import warnings

import torch

from weightkit.backend import allow_tf32 as tf32  # TF32 allowed or not inside a block

STEPS, REPEATS = 20, 5
CASES = (((4096, 4096), 1024), ((4096, 11008), 512))
REFRESH = (4096, 1024)  # the refresh rows' square size and rank
SMOKE = (1000, 1536, 96)  # the compiled-kernel check's m, n, r
SYNCS_CASE = ((1024, 1024), 256)  # the sync count's shape and rank
# the projection rows' shapes (m x n) and ranks: + 4096^2 at r256 (below SPLIT_FLOAT32_MIN_RANK: where the one-pass
# parts may move it) and a 350M MLP's
PROJECTION_CASES = CASES + (((4096, 4096), 256), ((1024, 2736), 256))
DEVICE = "cuda"  # "cpu": a dry run of the code paths for the tests (Triton through the interpreter; timings mean
#                  nothing, no syncs are counted)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def step_ms(step, steps=STEPS, repeats=REPEATS) -> float:
    for _ in range(3 if DEVICE == "cuda" else 1):
        step()
    _sync()
    if DEVICE != "cuda":  # a dry run: one timed step
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def call_ms(fn, repeats=3) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats if DEVICE == "cuda" else 1):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def make_optimizer(kind, shape, rank, **extra):
    from weightkit.optim import GaLoreAdamW, GaLoreAdamW8bit

    dtype = extra.pop("dtype", torch.float32)
    p = torch.nn.Parameter((torch.randn(shape, device=DEVICE) * 0.02).to(dtype))
    p.grad = torch.randn(shape, device=DEVICE).to(dtype)
    group = {"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25, "proj_type": "std"}
    nonfinite = extra.pop("nonfinite", "raise")
    group.update(extra)
    if kind != "galore-torch":  # the first step's basis by the randomized SVD, a tenth of the exact one's time (about
        # 1 s at 4096^2 on an H200: ~40 optimizers here); no refresh is timed (update_proj_gap 10**6)
        group.setdefault("svd", "randomized")
    if kind == "galore-torch":
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = galore_torch.GaLoreAdamW([group], lr=1e-3)
    else:
        opt = {"GaLoreAdamW": GaLoreAdamW, "GaLoreAdamW8bit": GaLoreAdamW8bit}[kind]([group], lr=1e-3,
                                                                                     nonfinite=nonfinite)
    opt.step()  # the projector and the state
    _sync()
    return opt


def _row(rows, what, ms=None, base=None, target=None, **info):
    rec = dict(what=what, **info)
    if ms is not None:
        rec["ms"] = round(ms, 4)
    if base is not None and ms:
        rec["baseline_ms"] = round(base, 4)
        rec["speedup_vs_baseline"] = round(base / ms, 3)
    if target is not None:
        rec["target"] = target
    rows.append(rec)
    print(json.dumps(rec), flush=True)
    return rec


def _guarded(rows, what, fn, **info):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the table
        _row(rows, what, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", **info)
        return None


def steps(rows):
    from weightkit import use_backend

    try:
        import galore_torch  # noqa: F401
        have_galore_torch = True
    except Exception:  # noqa: BLE001
        have_galore_torch = False
    for shape, rank in CASES:
        tag = f"{shape[0]}x{shape[1]} r{rank}"
        base = {}
        for allowed in (True, False):
            with tf32(allowed):
                mode = "tf32" if allowed else "strict fp32"
                if have_galore_torch:
                    base[mode] = _guarded(rows, f"galore-torch {mode} {tag}",
                                          lambda: step_ms(make_optimizer("galore-torch", shape, rank).step))
                    if base[mode] is not None:
                        _row(rows, f"galore-torch {mode} {tag}", base[mode], baseline=True)
                wk = {}
                for backend in ("auto", "cuda", "triton"):
                    for nonfinite in ("raise", "skip"):
                        name = f"weightkit GaLoreAdamW {backend} {nonfinite} {mode} {tag}"

                        def run():
                            with use_backend(backend):
                                opt = make_optimizer("GaLoreAdamW", shape, rank, nonfinite=nonfinite)
                                return step_ms(opt.step)

                        ms = _guarded(rows, name, run)
                        if ms is not None:
                            wk[(backend, nonfinite)] = ms
                            _row(rows, name, ms, base.get(mode),
                                 ">= 1.5x galore-torch tf32" if allowed else ">= 1.0x galore-torch strict")
                if not allowed and shape == CASES[0][0]:  # bf16 weights (a bf16 model), torch's default setting:
                    # galore-torch projects with a bf16 basis (bf16 GEMMs, bf16 results); weightkit keeps a float32
                    # basis and multiplies its three bf16 parts (float32 accuracy, three bf16 GEMMs; no target)
                    b16 = None
                    if have_galore_torch:
                        b16 = _guarded(rows, f"galore-torch bf16 weights {mode} {tag}", lambda: step_ms(
                            make_optimizer("galore-torch", shape, rank, dtype=torch.bfloat16).step))
                        if b16 is not None:
                            _row(rows, f"galore-torch bf16 weights {mode} {tag}", b16, baseline=True)
                    name = f"weightkit GaLoreAdamW auto raise bf16 weights {mode} {tag}"
                    ms = _guarded(rows, name, lambda: step_ms(
                        make_optimizer("GaLoreAdamW", shape, rank, dtype=torch.bfloat16).step))
                    if ms is not None:
                        _row(rows, name, ms, b16)
                if allowed:
                    for backend in ("auto", "cuda", "triton"):
                        for nonfinite in ("raise", "skip"):
                            name = f"weightkit GaLoreAdamW proj bf16 {backend} {nonfinite} {tag}"

                            def run16():
                                with use_backend(backend):
                                    opt = make_optimizer("GaLoreAdamW", shape, rank, nonfinite=nonfinite,
                                                         proj_dtype="bfloat16")
                                    return step_ms(opt.step)

                            ms = _guarded(rows, name, run16)
                            if ms is not None:
                                _row(rows, name, ms, base.get("tf32"), ">= 2.5x galore-torch tf32")
                    name = f"weightkit GaLoreAdamW8bit auto raise tf32 {tag}"
                    ms = _guarded(rows, name, lambda: step_ms(make_optimizer("GaLoreAdamW8bit", shape, rank).step))
                    if ms is not None:
                        _row(rows, name, ms, wk.get(("auto", "raise")), "<= 1.2x GaLoreAdamW's time "
                             "(speedup_vs_baseline >= 0.833)")


def refresh(rows):
    from weightkit.optim import projector
    from weightkit.optim.projector import compute_basis

    size, rank = REFRESH
    grad = torch.randn(size, size, device=DEVICE)
    for allowed in (True, False):
        with tf32(allowed):
            mode = "tf32" if allowed else "strict fp32"
            for orth in ("cholqr", "householder"):
                for range_dtype in (None, torch.bfloat16):
                    name = (f"refresh randomized {orth} range {'bf16' if range_dtype else 'fp32'} {mode} "
                            f"{size}^2 r{rank}")
                    ms = _guarded(rows, name, lambda: call_ms(lambda: compute_basis(
                        grad, rank, "left", "randomized", orthonormalize=orth, range_dtype=range_dtype)))
                    if ms is not None:
                        _row(rows, name, ms, target="<= 50 ms")
    with tf32(True):
        name = f"refresh small-svd randomized cholqr range fp32 tf32 {size}^2 r{rank}"
        ms = _guarded(rows, name, lambda: call_ms(lambda: compute_basis(
            grad, rank, "left", "randomized", orthonormalize="cholqr", small_svd="svd")))
        if ms is not None:
            _row(rows, name, ms, target="<= 50 ms")
        # a gradient's spectrum decays (a Gaussian matrix's top quarter spans a factor of ~2): singular values
        # falling 16 decades over the 4096, so the range block's span 1e4; a Cholesky-QR that fails there (its
        # flag, read once) redoes the refresh with Householder QR: counted in 'fallbacks'
        name = f"refresh randomized cholqr range fp32 tf32 decaying spectrum {size}^2 r{rank}"

        def decaying():
            gen = torch.Generator(device=DEVICE).manual_seed(1)
            u = torch.linalg.qr(torch.randn(size, size, device=DEVICE, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(size, size, device=DEVICE, generator=gen))[0]
            a = (u * torch.logspace(0, -16, size, device=DEVICE)) @ v.T
            before = projector.cholqr_fallbacks
            ms = call_ms(lambda: compute_basis(a, rank, "left", "randomized", orthonormalize="cholqr"))
            return ms, projector.cholqr_fallbacks - before

        got = _guarded(rows, name, decaying)
        if got is not None:
            _row(rows, name, got[0], target="<= 50 ms", fallbacks=got[1])
    name = f"refresh exact {size}^2 r{rank}"
    ms = _guarded(rows, name, lambda: call_ms(lambda: compute_basis(grad, rank, "left", "exact"), repeats=1))
    if ms is not None:
        _row(rows, name, ms)
    refresh_phases(rows, grad, rank)
    if DEVICE == "cuda":  # the exact refresh (GaLore's default, as galore-torch's) by cuSOLVER's QR-iteration driver,
        # against torch's default (Jacobi gesvdj for sides over 32): which one a later change should pick
        name = f"refresh exact driver gesvd {size}^2 r{rank}"
        ms = _guarded(rows, name, lambda: call_ms(lambda: torch.linalg.svd(grad, full_matrices=False,
                                                                           driver="gesvd"), repeats=1))
        if ms is not None:
            _row(rows, name, ms)


def refresh_phases(rows, grad, rank, oversample=8, power_iters=2):
    """The parts of a randomized refresh, each timed alone on the refresh rows' gradient (A, m x n) and a
    k-column basis (k = rank + oversample): the range finder's 1 + 2 ``power_iters`` products (A Omega, A^T Q,
    A Q: k columns each) in float32 with and without TF32 and on bf16 operands; as many orthonormalizations of an
    m x k matrix as a refresh makes (Cholesky-QR3 once and its shifted pass alone for the rest, or Householder QR
    each time); the small problem, SVD of B = Q^T A (k x n) or the eigenvectors of B B^T (k x k, float64), B's
    product included."""
    from weightkit.ops.galore import mm_float32
    from weightkit.optim.projector import _householder, _small_factorization, cholesky_qr

    m, n = grad.shape
    k = min(rank + oversample, m, n)
    products = 1 + 2 * power_iters
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    y = torch.randn(m, k, device=DEVICE, generator=gen)
    q = torch.linalg.qr(y)[0]
    tag = f"{m}x{n} k{k}"
    for label, dtype, allowed in (("fp32 strict", torch.float32, False), ("fp32 tf32", torch.float32, True),
                                  ("bf16", torch.bfloat16, True)):
        low, ql = grad.to(dtype), q.to(dtype)
        with tf32(allowed):
            name = f"refresh phase range products x{products} {label} {tag}"
            ms = _guarded(rows, name, lambda: call_ms(lambda: [mm_float32(low, ql, low.is_cuda)
                                                               for _ in range(products)]))
            if ms is not None:
                _row(rows, name, ms)
    # a refresh orthonormalizes 1 + 2 power_iters times: by Cholesky-QR, three passes for the last basis and the
    # shifted pass alone before it (cholqr3 x1 + cholqr1 x(products - 1)), or by Householder QR each time
    for label, orth, times in (("cholqr3", lambda: cholesky_qr(y, 3)[0], 1),
                               ("cholqr1", lambda: cholesky_qr(y, 1)[0], products - 1),
                               ("householder", lambda: _householder(y), products)):
        for allowed in (True, False):
            with tf32(allowed):
                name = f"refresh phase orthonormalize {label} x{times} {'tf32' if allowed else 'strict fp32'} " \
                       f"{m}x{k}"
                ms = _guarded(rows, name, lambda: call_ms(lambda: [orth() for _ in range(times)]))
                if ms is not None:
                    _row(rows, name, ms)
    with tf32(True):
        for small in ("svd", "gram"):
            name = f"refresh phase small {small} tf32 {tag}"
            ms = _guarded(rows, name, lambda: call_ms(lambda: _small_factorization(q, grad, rank, small)))
            if ms is not None:
                _row(rows, name, ms)


def syncs(rows):
    message = "called a synchronizing CUDA operation"
    for nonfinite in ("raise", "skip"):
        for kind in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            def count():
                opt = make_optimizer(kind, *SYNCS_CASE, nonfinite=nonfinite)
                opt.step()
                _sync()
                if DEVICE != "cuda":  # a dry run: the step's code, nothing to count
                    opt.step()
                    return []
                with warnings.catch_warnings(record=True) as caught:  # weightkit's default settings
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        opt.step()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                return [f"{w.filename}:{w.lineno}" for w in caught if message in str(w.message)]

            where = _guarded(rows, f"host syncs per step {kind} {nonfinite}", count)
            if where is not None:
                _row(rows, f"host syncs per step {kind} {nonfinite}", syncs=len(where), at=where[:4],
                     target="<= 1" if nonfinite == "raise" else "0")


def kernel_smoke(rows):
    """The compiled Triton kernel (autotuned) against the reference: float32 operands without TF32 (bf16x6) and with,
    bf16 operands, predicated."""
    from weightkit.ops.galore import _GALORE

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for left in (True, False):
        for ortho_dtype, allowed, wdtype in ((torch.float32, False, torch.float32),
                                             (torch.float32, True, torch.float32),
                                             (torch.bfloat16, True, torch.float32),
                                             (torch.float32, True, torch.bfloat16),
                                             (torch.float32, False, torch.bfloat16)):
            m, n, r = SMOKE
            w = torch.randn(m, n, device=DEVICE, generator=gen).to(wdtype)
            shape = (r, n) if left else (m, r)
            low = torch.randn(shape, device=DEVICE, generator=gen)
            ea = torch.randn(shape, device=DEVICE, generator=gen) * 0.1
            eas = torch.rand(shape, device=DEVICE, generator=gen) * 0.1
            q = torch.linalg.qr(torch.randn(m if left else n, r, device=DEVICE, generator=gen))[0]
            ortho = (q if left else q.T.contiguous()).to(ortho_dtype)
            name = f"smoke triton left={left} ortho={ortho_dtype} tf32={allowed} w={wdtype}"

            def check():
                with tf32(allowed):
                    outs = {}
                    for backend in ("reference", "triton"):
                        for found in (0.0, 1.0):
                            args = [t.clone() for t in (w, low, ea, eas)]
                            _GALORE.impls[backend](*args, ortho, left, 0.9, 0.999, 1e-6, 3e-2, 0.25, 0.99,
                                                   torch.full((1,), found, device=DEVICE), None)
                            outs[(backend, found)] = args
                _sync()
                err = (outs[("triton", 0.0)][0].float() - outs[("reference", 0.0)][0].float()).abs().max().item()
                unchanged = all(torch.equal(a, b) for a, b in zip(outs[("triton", 1.0)], (w, low, ea, eas)))
                return err, unchanged

            got = _guarded(rows, name, check)
            if got is not None:
                sixteen = ortho_dtype == torch.bfloat16 or wdtype == torch.bfloat16
                tol = 5e-2 if sixteen else (1e-2 if allowed else 1e-4)
                _row(rows, name, max_abs_err=got[0], ok=got[0] <= tol and got[1], predicated_unchanged=got[1])


def write_back(rows):
    """The fused write-back op alone (M, V, U, then W <- decay W - a P U; a left float32 basis at the first step
    case's size), per weight dtype: the Triton kernel at 'bf16x6' (the default without TF32 since 2026-12-07: six bf16
    tensor-core products of three-part splits, float32 accuracy) against 'ieee' (its strict-fp32 FMA dots, the
    kernel before) and 'tf32'; and the cuda backend's op without TF32 beside them (one cuBLAS bf16 GEMM over the six
    pairs of three-part splits a block of rows, then the update), each against the Triton 'ieee' row; for a float32
    weight also ``addmm_``'s strict-fp32 GEMM alone (the cuda backend's write-back before, and galore-torch's
    product)."""
    from weightkit import use_backend
    from weightkit.kernels.galore import galore_adam_update_triton
    from weightkit.ops.galore import galore_adam_update_

    (m, n), r = CASES[0]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.linalg.qr(torch.randn(m, r, device=DEVICE, generator=gen))[0]
    low = torch.randn(r, n, device=DEVICE, generator=gen)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-6, step_size=1e-3, scale=0.25, decay=1.0)
    for wdtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(m, n, device=DEVICE, generator=gen) * 0.02).to(wdtype)
        ea, eas = torch.zeros_like(low), torch.zeros_like(low)
        tag = f"{m}x{n} r{r} left {str(wdtype).replace('torch.', '')} weight"
        base = None
        for precision in ("ieee", "bf16x6", "tf32"):
            name = f"write-back triton {precision} {tag}"
            ms = _guarded(rows, name, lambda: step_ms(lambda: galore_adam_update_triton(
                w, low, ea, eas, q, True, **hyper, precision=precision)))
            if ms is not None:
                _row(rows, name, ms, base)
                base = ms if precision == "ieee" else base

        def cuda_op():
            with tf32(False), use_backend("cuda"):
                return step_ms(lambda: galore_adam_update_(w, low, ea, eas, q, True, **hyper))

        name = f"write-back cuda strict fp32 {tag}"
        ms = _guarded(rows, name, cuda_op)
        if ms is not None:
            _row(rows, name, ms, base)
        if wdtype == torch.float32:
            def addmm():
                with tf32(False):
                    return step_ms(lambda: w.addmm_(q, low, alpha=-1e-6))

            name = f"write-back addmm_ strict fp32 {tag}"
            ms = _guarded(rows, name, addmm)
            if ms is not None:
                _row(rows, name, ms, base)


def projection(rows):
    """The projection R = P^T G of a float32 gradient alone (what a float32 model's or bf16 autocast's GaLore step
    projects; a left basis, as GaLore's 'std' takes for m <= n) without TF32, at the step cases' sizes and a 350M
    model's 1024 x 2736 r256: G and P in three bf16 parts, six products in three cuBLAS bf16 GEMMs
    (weightkit.optim.basis.split_projection, which FloatBasis.project takes from SPLIT_FLOAT32_MIN_RANK and
    SPLIT_FLOAT32_MIN_FLOPS) against cuBLAS's strict-fp32 GEMM (the base; galore-torch's projection), and TF32; each
    with its relative error against float64 (no target: where the thresholds belong). G's parts come from
    weightkit::bf16_parts: `split bf16x6` is what auto runs (one CUDA pass), `... <backend> parts` each backend
    forced (reference: torch's four elementwise passes, as before the one-pass kernels); and `bf16_parts <backend>
    <m>x<n> float32` times the parts of the whole G alone, with the bytes it moves (10 a value: G read, three bf16
    parts written; the report gives GB/s and the share of its copy row's bandwidth)."""
    from weightkit import use_backend
    from weightkit.ops import galore as galore_ops
    from weightkit.optim.basis import SPLIT_FLOAT32_MIN_FLOPS, SPLIT_FLOAT32_MIN_RANK, split_projection

    device = torch.device(DEVICE)
    parts_backends = [b for b in ("reference", "cuda", "triton") if galore_ops._PARTS.why_not(b, device) is None]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    for (m, n), r in PROJECTION_CASES:
        g = torch.randn(m, n, device=DEVICE, generator=gen)
        p = torch.linalg.qr(torch.randn(m, r, device=DEVICE, generator=gen))[0]
        ref = p.double().T @ g.double()
        rel = lambda t: float((t.double() - ref).norm() / ref.norm())  # noqa: E731
        tag = f"{m}x{n} r{r} left float32 G"
        flops = 2 * m * n * r
        ways = [("strict fp32 GEMM", False, None, lambda: p.T @ g),
                ("split bf16x6", False, None, lambda: split_projection(g, "left", p))]
        ways += [(f"split bf16x6 {b} parts", False, b, lambda: split_projection(g, "left", p)) for b in parts_backends]
        ways.append(("tf32", True, None, lambda: p.T @ g))
        base = None
        for way, allowed, forced, fn in ways:
            name = f"projection {way} {tag}"

            def run(fn=fn, allowed=allowed, forced=forced):
                with tf32(allowed), (use_backend(forced) if forced else contextlib.nullcontext()):
                    return step_ms(fn), rel(fn())
            got = _guarded(rows, name, run)
            if got is not None:
                _row(rows, name, got[0], base, rel_err=got[1], flops=flops,
                     split_by_default=flops >= SPLIT_FLOAT32_MIN_FLOPS and r >= SPLIT_FLOAT32_MIN_RANK)
                base = got[0] if base is None else base
    for m, n in sorted({shape for shape, _ in PROJECTION_CASES}):
        g = torch.randn(m, n, device=DEVICE, generator=gen)
        for b in parts_backends:
            name = f"bf16_parts {b} {m}x{n} float32"

            def run_parts(b=b, g=g):
                with use_backend(b):
                    return step_ms(lambda: galore_ops.bf16_parts(g, 0))
            ms = _guarded(rows, name, run_parts)
            if ms is not None:
                _row(rows, name, ms, bytes=10 * g.numel())  # (the report adds GB/s and % of its copy row's)


def table(rows=None):
    """All rows of issue #25's table that one GPU call can measure (see the module docstring), appended to ``rows``
    (a new list unless given: bench/gpu_report.py passes one that records each row as it comes)."""
    rows = [] if rows is None else rows
    for section in (kernel_smoke, syncs, steps, refresh, write_back, projection):
        section(rows)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    rows = table()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if argv:
        with open(argv[0], "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
