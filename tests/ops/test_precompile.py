"""Launcher.precompile (kernels/_shared.py): a tuned launch compiles every config its autotuner will time in
parallel threads first, so the autotuner then only times them. Triton's JIT path does not run under the interpreter,
so the check runs in a child process without TRITON_INTERPRET on a stand-in driver (tests/fake_triton_gpu.py):
real sm_90 compiles, no launches."""

import json
import threading

import pytest
import torch
import triton
import triton.language as tl

from tests.fake_triton_gpu import run_child

pytestmark = pytest.mark.triton_kernels


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK <= 512)  # BLOCK 1024 fails to compile, as a config the tuner must skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def _child_main():
    """In the child: tune one bucket of a Launcher over 10 configs (8 kept by its pruner, 2 of which fail to
    compile) twice; print what compiled where (precompile or the autotuner's loop; worker thread or main) as JSON."""
    from tests import fake_triton_gpu
    from weightkit.kernels import _shared

    fake = fake_triton_gpu.install()
    configs = [_shared.config(w, 1, BLOCK=b) for b in (128, 256, 512, 1024, 2048) for w in (2, 4)]
    launcher = _shared.Launcher(_double_kernel, configs, key=["n"],
                                prune=lambda configs, named_args, **kw: [c for c in configs
                                                                         if c.kwargs["BLOCK"] <= 2 * named_args["n"]])
    compiles, phase, precompiled = [], ["tune"], []
    real_precompile = launcher.precompile

    def precompile(args, meta):
        phase[0] = "precompile"
        precompiled.append(real_precompile(args, meta))
        phase[0] = "tune"
        return precompiled[-1]

    launcher.precompile = precompile
    import triton.compiler

    real_compile = triton.compiler.compile  # what JITFunction's binder takes as its compile

    def counting(*args, **kwargs):
        compiles.append((phase[0], threading.current_thread() is threading.main_thread()))
        return real_compile(*args, **kwargs)

    triton.compiler.compile = counting
    x = torch.randn(700)
    y = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(700, meta["BLOCK"]),)  # noqa: E731
    cfg, launched = launcher.choose("b", grid, (x, y, 700), {})
    _, launched2 = launcher.choose("b", grid, (x, y, 700), {})
    bad = real_precompile((x, y, 700), {"BOGUS": 1})  # an argument the kernel does not take: left to the autotuner
    print(json.dumps(dict(precompiled=precompiled, compiles=compiles, launched=launched, again=launched2, bad=bad,
                          best=cfg.kwargs, timed=fake.benchmarks, threads=_shared.compile_threads(),
                          cached=len(_double_kernel.device_caches[0][0]))))


def _child(threads):
    return run_child(__file__, WEIGHTKIT_COMPILE_THREADS=str(threads))


def test_tuned_launch_compiles_its_configs_before_timing_them():
    out = _child(4)
    # the pruner keeps BLOCK 128 to 1024 (<= 2 n = 1400) x 2 warp counts: 8 configs, compiled in the worker threads
    # before the autotuner times them; the 6 that compile are not compiled again by its timing loop, the 2 that fail
    # (BLOCK 1024) fail there again and lose; each timed once (the 2 failing inside the benchmark); the bucket's
    # second call neither compiles nor tunes
    assert out["threads"] == 4 and out["precompiled"] == [8], out
    assert out["compiles"] == [["precompile", False]] * 8 + [["tune", True]] * 2 and out["cached"] == 6, out
    assert out["timed"] == 8 and out["launched"] is True and out["again"] is False, out
    assert out["best"]["BLOCK"] in (128, 256, 512), out
    assert out["bad"] == 0, out  # precompile never raises: what fails there is the autotuner's to report


def test_one_thread_leaves_compiling_to_the_autotuner():
    out = _child(1)
    assert out["precompiled"] == [0] and out["compiles"] == [["tune", True]] * 8 and out["timed"] == 8, out


if __name__ == "__main__":
    _child_main()
