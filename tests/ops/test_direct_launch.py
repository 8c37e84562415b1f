"""Direct launches (kernels/_shared.py, Plan.launch): after a plan's first launch through Triton's JITFunction.run,
later calls go to the compiled kernel's launcher directly. They must hand the launcher exactly what run() would
(the grid, the stream, the kernel handle, its metadata and every argument, constexprs included), and must go back to
run() whenever run() would have specialized the call differently (another device, a tensor's dtype or 16-byte
alignment, an int's value) or a launch hook is registered.

Triton's JIT path does not run under the interpreter, so the checks run in a child process without TRITON_INTERPRET
on the stand-in driver (tests/fake_triton_gpu.py: real sm_90 compiles; its launcher records the arguments it gets)."""

import json
import os

import pytest
import torch
import triton
import triton.language as tl

from tests.fake_triton_gpu import run_child

pytestmark = pytest.mark.triton_kernels


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, TWICE: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n) * factor
    if TWICE:
        v = v * 2
    tl.store(y_ptr + offs, v, mask=offs < n)


HOOK_SLOTS = slice(6, 9)  # (..., launch_metadata, enter hook, exit hook, *args): None on direct launches


def _norm(args, inputs=None):
    """A launcher's arguments, JSON-comparable, the launch metadata and hooks left out: a tensor as its dtype, shape
    and which of ``inputs`` it is (-1: one the op made, e.g. its output), or its address when ``inputs`` is None."""
    if args is None:
        return None
    args = args[:HOOK_SLOTS.start] + args[HOOK_SLOTS.stop:]

    def which(t):
        if inputs is None:
            return t.data_ptr()
        return next((i for i, x in enumerate(inputs) if x.data_ptr() == t.data_ptr()), -1)
    return [["tensor", str(a.dtype), list(a.shape), which(a)] if isinstance(a, torch.Tensor) else repr(a)
            for a in args]


def _child_main():
    from tests import fake_triton_gpu
    from triton.runtime import jit

    fake = fake_triton_gpu.install()
    from weightkit.kernels import _shared, galore, int4, int8, memoryformer, qgalore
    from weightkit.ops.int4 import quantize_int4

    runs = [0]
    real_run = jit.JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs[0] += 1
        return real_run(self, *args, **kwargs)

    jit.JITFunction.run = counting_run
    out = {"direct": _shared.DIRECT_LAUNCH}

    def four_calls(name, call, *inputs):
        """Four identical calls: what the launcher got each time and how many went through run()."""
        got = []
        for _ in range(4):
            before = runs[0]
            call()
            got.append(dict(args=_norm(fake.last_launch, inputs), runs=runs[0] - before,
                            hooks=[repr(a) for a in fake.last_launch[HOOK_SLOTS]]))
        out[name] = got

    torch.manual_seed(0)
    # the ops' own plans (fixed configs: below the tuning sizes), decode and prefill kernels
    w_q = torch.randint(-127, 128, (256, 512), dtype=torch.int8)
    scale = torch.rand(256, 4) + 0.5
    for tokens in (2, 40):
        x = torch.randn(tokens, 512, dtype=torch.bfloat16)
        four_calls(f"int8_matmul {tokens} tokens", lambda: int8.int8_matmul_triton(x, w_q, scale, 128, False),
                    x, w_q, scale)
    q4, s4, z4 = quantize_int4(torch.randn(256, 512), 64)
    x = torch.randn(1, 512)
    four_calls("int4_matmul 1 token", lambda: int4.int4_matmul_triton(x, q4, s4, z4, 64, 256, 512, False),
                x, q4, s4, z4)
    x, tables = torch.randn(3, 64), torch.randn(16, 16, 128)
    four_calls("memory_lookup_forward", lambda: memoryformer.memory_lookup_forward_triton(x, tables, 1.0), x, tables)
    x = torch.randn(64, 256)  # (a tuned launch: the autotuner makes the first one, run() the second)
    four_calls("stochastic_round_int8", lambda: int8.stochastic_round_int8_triton(
        x, torch.rand(64, 2) + 0.5, 128, 3, 0), x)
    # an optimizer step's kernels (_shared.launch): GaLore's Adam and its tuned matmul (the second call launches the
    # tuned config through run() once), the 8-bit moments
    weight, low, ortho = torch.randn(96, 80), torch.randn(16, 80), torch.linalg.qr(torch.randn(96, 16))[0]
    m1, v1 = torch.zeros(16, 80), torch.zeros(16, 80)
    four_calls("galore_adam_update", lambda: galore.galore_adam_update_triton(
        weight, low, m1, v1, ortho, True, 0.9, 0.999, 1e-8, 1e-2, 0.25, 1.0), weight, ortho)
    n8 = 600
    codes = torch.linspace(-1.0, 1.0, 256), torch.linspace(0.0, 1.0, 256)
    moments = [torch.randint(0, 256, (n8,), dtype=torch.uint8), torch.rand(3) + 0.5,
               torch.randint(0, 256, (n8,), dtype=torch.uint8), torch.rand(3) + 0.5]
    g8, out8 = torch.randn(n8), torch.empty(n8)
    four_calls("blockwise8bit_adam", lambda: qgalore.blockwise8bit_adam_triton(
        g8, *moments, *codes, out8, 0.9, 0.999, 1e-8), g8, out8, *moments)

    # the guard, on a plan of a small kernel: what takes run() again (re-recorded each time: no limit here)
    limit, _shared.DIRECT_RECORDS = _shared.DIRECT_RECORDS, 100
    plan = _shared.Plan(_scale_kernel, (4,), {"BLOCK": 64, "num_warps": 1}, None)
    base = torch.randn(300)
    x, y = base[:256], torch.empty(256)
    steps = []

    def step(what, *args):
        before = runs[0]
        plan.launch(*args)
        steps.append([what, runs[0] - before, _norm(fake.last_launch)])

    step("first", x, y, 256, 1.5)
    step("second (records)", x, y, 256, 1.5)
    step("same", x, y, 256, 1.5)
    step("another float (not specialized)", x, y, 256, 0.5)
    step("another int", x, y, 255, 0.5)
    step("same again", x, y, 255, 0.5)
    step("misaligned tensor", base[1:257], y, 255, 0.5)
    step("aligned again", x, y, 255, 0.5)
    step("other tensor, same alignment", base[4:260], y, 255, 0.5)
    step("another dtype", x.double(), y, 255, 0.5)
    x64 = x.double()
    step("same dtype again", x64, y, 255, 0.5)
    fake.device = 1
    step("another device", x64, y, 255, 0.5)
    step("that device again", x64, y, 255, 0.5)
    hook = lambda metadata: None  # noqa: E731
    _shared._RUNTIME.launch_enter_hook.add(hook)
    step("launch hook", x64, y, 255, 0.5)
    _shared._RUNTIME.launch_enter_hook.remove(hook)
    step("hook removed", x64, y, 255, 0.5)
    out["steps"] = steps
    _shared.DIRECT_RECORDS = limit
    # an int that changes with every call (a seed): re-recorded DIRECT_RECORDS times, then run() for good
    seeded = _shared.Plan(_scale_kernel, (4,), {"BLOCK": 64, "num_warps": 1}, None)
    taken = []
    for seed in range(3, 3 + _shared.DIRECT_RECORDS + 3):
        before = runs[0]
        seeded.launch(x, y, seed, 0.5)
        taken.append(runs[0] - before)
    # a launcher that refuses a direct launch's arguments: one warning, run() for that call and from then on
    import warnings

    failing = _shared.Plan(_scale_kernel, (4,), {"BLOCK": 64, "num_warps": 1}, None)
    failing.launch(x, y, 256, 0.5)
    failing.launch(x, y, 256, 0.5)
    if failing.direct is None:  # direct launches off (WEIGHTKIT_TRITON_DIRECT_LAUNCH=0)
        print(json.dumps(out))
        return

    def refuse(*args):
        raise TypeError("launcher arguments")
    failing.direct.run = refuse
    before = runs[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failing.launch(x, y, 256, 0.5)
        failing.launch(x, y, 256, 0.5)
    out["refused"] = dict(runs=runs[0] - before, direct_after=_shared.DIRECT_LAUNCH,
                          warnings=[str(w.message) for w in caught], args=_norm(fake.last_launch))
    _shared.DIRECT_LAUNCH = True
    out["varying int"] = dict(runs=taken, records=seeded.records, direct=seeded.direct is not None,
                              limit=_shared.DIRECT_RECORDS)
    print(json.dumps(out))


def _child(**env):
    return run_child(__file__, **env)


@pytest.fixture(scope="module")
def child_out():
    return _child()


OPS = ["int8_matmul 2 tokens", "int8_matmul 40 tokens", "int4_matmul 1 token", "memory_lookup_forward",
       "stochastic_round_int8", "galore_adam_update", "blockwise8bit_adam"]
TUNED_FIRST = ("stochastic_round_int8", "galore_adam_update")  # the autotuner launches the first call


@pytest.mark.parametrize("name", OPS)
def test_later_calls_launch_directly_with_what_run_passed(child_out, name):
    calls = child_out[name]
    assert child_out["direct"] is True
    assert calls[0]["runs"] >= 1 and calls[0]["args"] is not None, calls
    # a plan's first two launches go through run() (the second records), the later ones are direct (for a tuned
    # launch the autotuner makes the first call, the plan's two run() launches the next two); the launcher got the
    # same arguments as from run() (the grid, stream and kernel handle at the front, the constexprs at the end), with
    # no launch metadata and no hooks where run() passes its empty hook chains
    direct_from = 3 if name in TUNED_FIRST else 2
    assert all(c["runs"] >= 1 for c in calls[:direct_from]), calls
    assert all(c["runs"] == 0 for c in calls[direct_from:]), calls
    assert all(c["args"] == calls[0]["args"] for c in calls), calls
    assert calls[-1]["hooks"] == ["None"] * 3 and "None" not in calls[0]["hooks"][1:], calls


def test_whatever_run_would_specialize_differently_takes_run_again(child_out):
    steps = {what: (runs, args) for what, runs, args in child_out["steps"]}
    took_run = [what for what, runs, _ in child_out["steps"] if runs]
    assert took_run == ["first", "second (records)", "another int", "misaligned tensor", "aligned again", "another dtype",
                        "another device", "launch hook"], child_out["steps"]
    # the direct launch passes the call's own values: the new float, the other tensor of the same alignment
    assert steps["another float (not specialized)"][1][-3] == "0.5"
    assert steps["other tensor, same alignment"][1] != steps["aligned again"][1]
    assert steps["same"][1] == steps["first"][1]
    # the constexprs and defaults after the positional arguments, as run() binds them (BLOCK 64, TWICE False)
    assert steps["same"][1][-2:] == ["64", "False"], steps["same"]


def test_a_plan_whose_ints_keep_changing_goes_back_to_run(child_out):
    out = child_out["varying int"]
    assert out["runs"] == [1] * (out["limit"] + 3) and out["records"] == out["limit"] and not out["direct"], out


def test_a_launcher_that_refuses_a_direct_launch_turns_them_off(child_out):
    out = child_out["refused"]
    # both calls went through run() (the launch that raised had launched nothing), with one warning naming the error
    assert out["runs"] == 2 and out["direct_after"] is False and out["args"] is not None, out
    assert len(out["warnings"]) == 1 and "TypeError: launcher arguments" in out["warnings"][0], out


def test_off_by_the_environment_variable():
    out = _child(WEIGHTKIT_TRITON_DIRECT_LAUNCH="0")
    assert out["direct"] is False
    assert all(c["runs"] >= 1 for name in OPS for c in out[name]), out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_launches_compute_what_run_computes_on_cuda(monkeypatch):
    """On a GPU: each op's fourth call (a direct launch, tuned or not) gives bit for bit the result of a call through
    run() alone."""
    from weightkit.kernels import _shared, int4, int8, memoryformer
    from weightkit.ops.int4 import quantize_int4

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    dev = "cuda"
    w_q = torch.randint(-127, 128, (256, 512), dtype=torch.int8, device=dev)
    scale = torch.rand(256, 4, device=dev) + 0.5
    q4, s4, z4 = quantize_int4(torch.randn(256, 512, device=dev), 64)
    x2, x40t = torch.randn(2, 512, device=dev, dtype=torch.bfloat16), torch.randn(40, 256, device=dev)
    xm, tables = torch.randn(3, 64, device=dev), torch.randn(16, 16, 128, device=dev)
    xs = torch.randn(64, 256, device=dev)
    calls = {"int8 2 tokens": lambda: int8.int8_matmul_triton(x2, w_q, scale, 128, False),
             "int8 40 tokens, transposed": lambda: int8.int8_matmul_triton(x40t, w_q, scale, 128, True),
             "int4 1 token": lambda: int4.int4_matmul_triton(x2[:1], q4, s4, z4, 64, 256, 512, False),
             "memory forward": lambda: memoryformer.memory_lookup_forward_triton(xm, tables, 1.0),
             "stochastic round": lambda: int8.stochastic_round_int8_triton(xs, torch.ones(64, 2, device=dev), 128,
                                                                           3, 4)}
    assert _shared.DIRECT_LAUNCH
    direct = {name: [call() for _ in range(4)][-1] for name, call in calls.items()}
    monkeypatch.setattr(_shared, "DIRECT_LAUNCH", False)
    _shared.clear_launch_caches()
    for name, call in calls.items():
        via_run = [call() for _ in range(4)][-1]
        torch.cuda.synchronize()
        assert torch.equal(direct[name], via_run), f"{name}: a direct launch differs from run()'s"
    _shared.clear_launch_caches()  # plans without direct records must not outlive the patch


if __name__ == "__main__":
    _child_main()
