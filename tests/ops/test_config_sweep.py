"""Every config the autotuners may pick, run and checked: the Triton interpreter runs each op once per config its
tuners' pruners keep for the case's shape (the spaces a GPU times, not the one config the interpreter tests use),
and each result is compared with a float64 reference (matmuls: |err| <= tol * the sum of |terms|) or, for the
stochastic-rounding and quantization kernels, with the reference backend bit for bit. A config that computes a wrong
result would otherwise be found only on a GPU, and only if it won the timing.

``python tests/ops/test_config_sweep.py [--cases REGEX]`` prints one JSON line (the cases, configs run per tuner,
failures) and exits 1 on any failure; the test below runs it in a subprocess with TRITON_INTERPRET=1 (about 3
minutes on 2 cores), so `make test` and scripts/check_triton.sh (under the GPU image's Triton) run it. No GPU needed.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class Sweep:
    """Patches the kernels' config spaces to the full ones and Autotuner.run to launch the pruned config number
    ``index`` (modulo the pruned count) without timing; records what each tuner ran."""

    def __init__(self):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from triton.runtime.autotuner import Autotuner

        from weightkit.kernels import _shared

        assert _shared.INTERPRET, "the sweep runs under TRITON_INTERPRET=1"
        _shared.space = lambda full, interpreted: full()  # before the per-op modules import it
        self.index = 0
        self.counts = {}  # tuner -> pruned configs in this case
        self.ran = {}  # tuner -> distinct configs run
        sweep = self

        def run_one(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            cfg = configs[sweep.index % len(configs)]
            name = tuner.base_fn.__name__
            sweep.counts[name] = max(sweep.counts.get(name, 0), len(configs))
            sweep.ran.setdefault(name, set()).add(str(cfg))
            tuner.best_config = cfg
            try:
                return tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            finally:
                tuner.nargs = None

        Autotuner.run = run_one
        from weightkit.kernels import galore  # a triton.autotune of its own: its full space, built as on a GPU

        galore.INTERPRET = False
        try:
            galore._matmul_update_kernel.configs = galore._matmul_configs()
        finally:
            galore.INTERPRET = True

    def run(self, name, case):
        """Call ``case()`` (a list of failure strings) once per pruned config of the tuners it reaches; returns the
        failures, each tagged with the config index."""
        from weightkit.kernels._shared import clear_launch_caches

        failures, i = [], 0
        self.counts = {}
        while True:
            self.index = i
            clear_launch_caches()
            try:
                failures += [f"{name} #{i}: {f}" for f in case()]
            except Exception as e:  # noqa: BLE001
                failures.append(f"{name} #{i}: {type(e).__name__}: {str(e)[-800:]}")
            i += 1
            if i >= max(self.counts.values(), default=1):
                return failures


def _bound_check(got, ref, bound, dtype, what):
    if got.shape != ref.shape:
        return [f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"]
    if not bool(torch.isfinite(got).all()):
        return [f"{what}: non-finite output"]
    err = (got.double() - ref).abs()
    worst = float((err - TOL[dtype] * bound - 1e-30).max()) if err.numel() else 0.0
    return [f"{what}: max |err| {float(err.max()):.3g} exceeds {TOL[dtype]} * sum |terms|"] if worst > 0 else []


DTYPES = ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True))  # (dtype, TF32 allowed)


def _dictionary_cases():
    from tests.ops.test_dictionary_ops import bitmask_inputs, bitmask_ref64
    from tests.ops.test_kernels_host import _tf32
    from weightkit.kernels import dictionary as kd

    kd.TUNE_MIN_WEIGHT = 0
    out = {}
    for dt, tf32 in DTYPES:
        for m in (1, 3, 12, 20, 50, 70):  # GEMV (1-2, 3-4 tokens), decode tiles of 16 / 32 / 64 tokens, prefill
            def case(m=m, dt=dt, tf32=tf32):
                torch.manual_seed(m)
                z, values, bitmask, offsets = bitmask_inputs(m, 200, 90, 150)
                z, values = z.to(dt), values.to(dt)
                g = torch.randn(m, 150).to(dt)
                y = _tf32(tf32, kd.dict_bitmask_matmul_triton, z, values, bitmask, offsets)
                gz, gv = _tf32(tf32, kd.dict_bitmask_matmul_backward_triton, g, z, values, bitmask, offsets)
                y64 = bitmask_ref64(z, values, bitmask)
                gz64, gv64 = bitmask_ref64(z, values, bitmask, g)
                y_bound = bitmask_ref64(z.abs(), values.abs(), bitmask)
                gz_bound, gv_bound = bitmask_ref64(z.abs(), values.abs(), bitmask, g.abs())
                return (_bound_check(y, y64, y_bound, dt, "y") + _bound_check(gz, gz64, gz_bound, dt, "grad_z")
                        + _bound_check(gv, gv64, gv_bound, dt, "grad_values"))
            out[f"bitmask {dt}{' tf32' if tf32 else ''} m{m}"] = case
    return out


def _quant_matmul_cases():
    from tests.ops.test_kernels_host import _tf32
    from weightkit.kernels import int4 as k4
    from weightkit.kernels import int8 as k8
    from weightkit.ops.int4 import dequantize_int4, quantize_int4
    from weightkit.ops.int8 import absmax_scale, dequantize_int8

    k8.TUNE_MIN_WEIGHT = k4.TUNE_MIN_WEIGHT = 0
    out = {}
    # (rows, cols, group): groups that divide the tiles, group 8 that divides none (per-element scales), and an
    # INT4 shape whose rows are not whole 16-byte vectors
    for dt, tf32 in DTYPES:
        for m in (1, 3, 12, 20, 50, 70):
            for t in (False, True):
                for kind, rows, cols, group in (("int8", 256, 512, 128), ("int8", 96, 200, 8), ("int4", 256, 512, 64),
                                                ("int4", 255, 500, 4)):
                    def case(m=m, dt=dt, tf32=tf32, t=t, kind=kind, rows=rows, cols=cols, group=group):
                        torch.manual_seed(m + 1000 * t)
                        w = torch.randn(rows, cols)
                        if kind == "int8":
                            scale = absmax_scale(w, group)
                            q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8)
                            w64 = dequantize_int8(q, scale, group).double()
                        else:
                            packed, scale, zero = quantize_int4(w, group)
                            w64 = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
                        x = torch.randn(m, rows if t else cols).to(dt)
                        if kind == "int8":
                            y = _tf32(tf32, k8.int8_matmul_triton, x, q, scale, group, t)
                        else:
                            y = _tf32(tf32, k4.int4_matmul_triton, x, packed, scale, zero, group, rows, cols, t)
                        wt = w64 if t else w64.T
                        return _bound_check(y, x.double() @ wt, x.double().abs() @ wt.abs(), dt, "y")
                    out[f"{kind}_matmul {rows}x{cols} g{group} {dt}{' tf32' if tf32 else ''} m{m} t{t}"] = case
    return out


def _memory_cases():
    from tests.ops.test_memoryformer_triton import T, inputs, ref64
    from weightkit.kernels import memoryformer as km

    km._TUNE_MIN_TABLE = 0
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        for n in (1, 16, 70):
            for det, seg in ((False, False), (False, True), (True, True)):  # atomics, segments, deterministic
                def case(n=n, dt=dt, det=det, seg=seg):
                    torch.manual_seed(n)
                    x, tables = inputs(n, 8, 4, 130, dt, "cpu")
                    g = torch.randn(n, 130).to(dt)
                    y64, gx64, gt64 = ref64(x, tables, g)
                    y = km.memory_lookup_forward_triton(x, tables, T)
                    gx, gt = km.memory_lookup_backward_triton(g, x, tables, T, det, seg)
                    fails = []
                    for what, a, b in (("y", y, y64), ("grad_x", gx, gx64), ("grad_tables", gt, gt64)):
                        try:
                            torch.testing.assert_close(a.double(), b, **tol[dt])
                        except AssertionError as e:
                            fails.append(f"{what}: {str(e).splitlines()[1:3]}")
                    return fails
                out[f"memory {dt} n{n} det{det} seg{seg}"] = case
    return out


def _galore_cases():
    from tests.ops.test_galore_ops import HYPER, TOL as GTOL, make, reference64
    from weightkit.kernels import galore as kg

    out = {}
    for wdt in (torch.float32, torch.bfloat16):
        for odt, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
            for left in (True, False):
                def case(wdt=wdt, odt=odt, tf32=tf32, left=left):
                    torch.manual_seed(int(left))
                    w, low, ea, eas, ortho = make(150, 140, 24, left, wdt)  # tails on every tile side
                    ortho = ortho.to(odt)
                    w64, ea64, eas64 = reference64((w, low, ea, eas, ortho, left))
                    kg.galore_adam_update_triton(w, low, ea, eas, ortho, left, HYPER["beta1"],
                                                 HYPER["beta2"], HYPER["eps"], HYPER["step_size"], HYPER["scale"],
                                                 HYPER["decay"], tf32=tf32)
                    tol = GTOL[torch.bfloat16] if torch.bfloat16 in (wdt, odt) else GTOL[wdt]
                    try:
                        torch.testing.assert_close(w.double(), w64, **tol)
                        torch.testing.assert_close(ea.double(), ea64, rtol=1e-5, atol=1e-6)
                        torch.testing.assert_close(eas.double(), eas64, rtol=1e-5, atol=1e-6)
                    except AssertionError as e:
                        return [str(e).splitlines()[1:3]]
                    return []
                out[f"galore w{wdt} ortho{odt}{' tf32' if tf32 else ''} left{left}"] = case
    return out


def _elementwise_cases():
    """The elementwise kernels, tuned on every call on a GPU: bit for bit the reference backend's result."""
    from weightkit import use_backend
    from weightkit.kernels import int4 as k4
    from weightkit.kernels import int8 as k8
    from weightkit.ops import int4, int8

    def same(what, got, ref):
        return [] if all(torch.equal(a, b) for a, b in zip(got, ref)) else [f"{what}: differs from the reference"]

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        for n in (1000, 4096 * 3 + 8):
            def sr(n=n, dt=dt):
                x = torch.randn(n).to(dt)
                scale = int8.absmax_scale(x, 8)
                got = k8.stochastic_round_int8_triton(x, scale, 8, 5, 3)
                with use_backend("reference"):
                    ref = int8.stochastic_round_int8(x, scale, 8, seed=5, offset=3)
                return same("stochastic_round_int8", (got,), (ref,))
            out[f"sr {dt} n{n}"] = sr

            def quant(n=n, dt=dt):
                x = torch.randn(n // 64 * 64).to(dt)
                got = k4.quantize_int4_triton(x, 64)
                with use_backend("reference"):
                    ref = int4.quantize_int4(x, 64)
                return same("quantize_int4", got, ref)
            out[f"quantize_int4 {dt} n{n}"] = quant
    for gs, offset in ((128, 0), (8, 4)):
        def upd(gs=gs, offset=offset):
            w = torch.randn(64, 256)
            scale = int8.absmax_scale(w, gs)
            q = int8.stochastic_round_int8(w, scale, gs, seed=1)
            delta = torch.randn(64, 256) * 0.05
            q1, s1 = q.clone(), scale.clone()
            k8.int8_sr_update_triton(q1.view(-1), s1, delta.view(-1), gs, 0.999, 7, offset)
            q2, s2 = q.clone(), scale.clone()
            with use_backend("reference"):
                int8.int8_sr_update_(q2, s2, delta, gs, decay=0.999, seed=7, offset=offset)
            return same("int8_sr_update_", (q1, s1), (q2, s2))
        out[f"int8_sr_update g{gs} off{offset}"] = upd
    return out


def sweep_all(pattern=None):
    sweep = Sweep()
    cases = {}
    for make in (_dictionary_cases, _quant_matmul_cases, _memory_cases, _galore_cases, _elementwise_cases):
        cases.update(make())
    failures, t0, n = [], time.time(), 0
    for name, case in cases.items():
        if pattern and not re.search(pattern, name):
            continue
        failures += sweep.run(name, case)
        n += 1
    return dict(cases=n, seconds=round(time.time() - t0), configs={k: len(v) for k, v in sorted(sweep.ran.items())},
                failures=failures)


@pytest.mark.triton_kernels
def test_every_pruned_config_computes_the_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=3600, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert report["cases"] and report["configs"], report
    assert not report["failures"], "\n".join(report["failures"][:40])


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    parser = argparse.ArgumentParser(description="run every pruner-kept Triton config in the interpreter")
    parser.add_argument("--cases", help="only the cases whose name matches this regular expression")
    result = sweep_all(parser.parse_args().cases)
    print(json.dumps(result))
    print(f"config sweep: {result['cases']} cases, {sum(result['configs'].values())} configs over "
          f"{len(result['configs'])} kernels, {len(result['failures'])} failures, {result['seconds']} s",
          file=sys.stderr)
    for f in result["failures"][:60]:
        print("  " + f, file=sys.stderr)
    sys.exit(1 if result["failures"] or not result["cases"] else 0)
