"""The host side of the Triton kernels (weightkit.kernels): the shared module's integer helpers, the module layout
(per-op files import only kernels/_shared.py), the device guard of every launcher (#23, with the CUDA
device/current-device calls mocked: no GPU here), the launch plans (#24: no autotuner call per call, token counts
bucketed) and int64 index arithmetic where an int32 product can pass 2^31 (run in the interpreter on tensors whose
storage is mostly virtual)."""

import ast
import argparse
import time
import contextlib
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from weightkit.kernels._shared import cdiv, next_pow2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = os.path.join(ROOT, "kernels")
PER_OP = tuple(sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(KERNELS, "*.py"))
                      if not os.path.basename(p).startswith("_")))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the kernels on CPU tensors (TRITON_INTERPRET=1)")


def test_cdiv_and_next_pow2():
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 1000):
            assert cdiv(a, b) == math.ceil(a / b)
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 63, 64, 65, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 64, 64, 128, 4096,
                                                                                   8192]
    assert all(next_pow2(n) >= n and next_pow2(n) & (next_pow2(n) - 1) == 0 and next_pow2(n) < 2 * max(n, 1)
               for n in range(1, 5000))


def _tree(name):
    with open(os.path.join(KERNELS, f"{name}.py")) as f:
        return ast.parse(f.read())


@pytest.mark.parametrize("name", PER_OP)
def test_per_op_modules_import_only_the_shared_module(name):
    """No per-op module serves as another's library, and none reads the environment (the interpreter switch is
    read once, in _shared)."""
    siblings = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            siblings.add(node.module)
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            pytest.fail(f"kernels/{name}.py reads os.environ; use kernels._shared.INTERPRET")
    assert siblings == {"_shared"}, f"kernels/{name}.py imports {sorted(siblings)}"


def test_shared_module_imports_no_per_op_module():
    relative = {n.module for n in ast.walk(_tree("_shared")) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert not relative, relative


# -- device guard ---------------------------------------------------------------------------------------------------

class _FakeCuda:
    """torch.cuda.current_device / torch.cuda.device stand-ins: records every query and every switch."""

    def __init__(self, current):
        self.current = current
        self.queries = 0
        self.switches = []
        self.active = None  # the device index inside a switch

    def current_device(self):
        self.queries += 1
        return self.current

    @contextlib.contextmanager
    def device(self, index):
        self.switches.append(index)
        previous, self.active = self.active, index
        try:
            yield
        finally:
            self.active = previous


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    return fake


def test_device_guard_switches_only_to_another_device(fake_cuda):
    from weightkit.kernels._shared import device_guard

    with device_guard(torch.device("cuda", 1)):
        assert fake_cuda.active == 1  # cuda:1 while cuda:0 is current: launch on cuda:1
    assert fake_cuda.switches == [1] and fake_cuda.active is None
    with device_guard(torch.device("cuda", 0)):  # already current: one query, no switch
        assert fake_cuda.active is None
    assert fake_cuda.switches == [1] and fake_cuda.queries == 2
    fake_cuda.current = 1
    with device_guard(torch.device("cuda", 1)):
        pass
    with device_guard(torch.device("cuda")):  # no index: the current device by definition
        pass
    with device_guard(torch.device("cpu")):  # the interpreter: CUDA is not even asked
        pass
    assert fake_cuda.switches == [1] and fake_cuda.queries == 3


def _launcher_calls(device):
    """One call of every launcher the ops use (every per-op file of kernels/), on tiny inputs."""
    from weightkit.kernels import dictionary, galore, int4, int8, memoryformer, qgalore
    from weightkit.ops.dictionary import index_dtype_for, pack_bitmask

    x = torch.randn(2, 64, device=device)
    q = torch.randint(-128, 128, (32, 64), dtype=torch.int8, device=device)
    scale = torch.rand(32 * 64 // 32, device=device) + 0.5
    packed, s4, z4 = int4.quantize_int4_triton(torch.randn(32, 64, device=device), 32)
    ell_i = torch.stack([torch.randperm(64, device=device)[:3] for _ in range(40)], dim=1)  # 3 atoms per column
    ell_v = torch.randn(3, 40, device=device)
    bitmask, values, offsets = pack_bitmask(ell_i.to(index_dtype_for(64)), ell_v, 64)
    tables = torch.randn(2, 16, 24, device=device)
    xm = torch.randn(3, 8, device=device)
    return {
        "stochastic_round_int8": lambda: int8.stochastic_round_int8_triton(x, scale[:4], 32, 7, 3),
        "int8_sr_update_tiled": lambda: int8.int8_sr_update_triton(q[:4].clone().view(-1), scale[:8].clone(),
                                                                  torch.randn(256, device=device), 32, 0.9, 1, 0),
        "int8_sr_update": lambda: int8.int8_sr_update_triton(q[:1].clone().view(-1), torch.rand(8, device=device) + 0.5,
                                                            torch.randn(64, device=device), 8, 0.9, 1, 1),
        "int8_matmul": lambda: int8.int8_matmul_triton(x, q, scale, 32, False),
        "quantize_int4": lambda: int4.quantize_int4_triton(x, 32),
        "dequantize_int4": lambda: int4.dequantize_int4_triton(packed, s4, z4, 32),
        "int4_matmul": lambda: int4.int4_matmul_triton(x, packed, s4, z4, 32, 32, 64, False),
        "galore_adam_update_": lambda: galore.galore_adam_update_triton(
            torch.randn(32, 24, device=device), torch.randn(4, 24, device=device), torch.zeros(4, 24, device=device),
            torch.zeros(4, 24, device=device), torch.randn(32, 4, device=device), True, 0.9, 0.999, 1e-6, 1e-2, 1.0,
            1.0),
        "lowrank_update_": lambda: galore.lowrank_update_triton(
            torch.randn(32, 24, device=device), torch.randn(4, 24, device=device), torch.randn(32, 4, device=device),
            True, 1e-2, 1.0, 1.0),
        "int8_sr_lowrank_update_": lambda: qgalore.int8_sr_lowrank_update_triton(
            q.clone(), scale.clone(), *int4.quantize_int4_triton(torch.randn(32, 4, device=device), 4),
            torch.randn(4, 64, device=device), 32, 4, True, 0.1, 0.99, "fp32", 7, 0),
        "blockwise8bit_adam_": lambda: qgalore.blockwise8bit_adam_triton(
            torch.randn(300, device=device), torch.randint(0, 256, (300,), dtype=torch.uint8, device=device),
            torch.rand(2, device=device) + 0.5, torch.randint(0, 256, (300,), dtype=torch.uint8, device=device),
            torch.rand(2, device=device) + 0.5, torch.linspace(-1, 1, 256, device=device),
            torch.linspace(0, 1, 256, device=device), torch.empty(300, device=device), 0.9, 0.999, 1e-6),
        "bf16_parts": lambda: galore.bf16_parts_triton(x, 0),
        "dict_bitmask_matmul": lambda: dictionary.dict_bitmask_matmul_triton(x, values, bitmask, offsets),
        "dict_bitmask_matmul_backward": lambda: dictionary.dict_bitmask_matmul_backward_triton(
            torch.randn(2, 40, device=device), x, values, bitmask, offsets),
        "memory_hash": lambda: memoryformer.memory_hash_triton(xm, 2, 4, 1.3),
        "memory_lookup_forward": lambda: memoryformer.memory_lookup_forward_triton(xm, tables, 1.3),
        "memory_lookup_backward": lambda: memoryformer.memory_lookup_backward_triton(
            torch.randn(3, 24, device=device), xm, tables, 1.3, False),
        "memory_lookup_backward_deterministic": lambda: memoryformer.memory_lookup_backward_triton(
            torch.randn(3, 24, device=device), xm, tables, 1.3, True),
    }


@pytest.mark.triton_kernels
@needs_interpreter
def test_every_launcher_launches_inside_its_device_guard(fake_cuda, monkeypatch):
    """Each launcher asks the guard for its tensors' device and launches every kernel inside it. The CPU tensors of
    the interpreter stand for tensors on cuda:1 (current device 0): the guard is handed cuda:1 in their place, so
    it really switches, and every kernel launch is checked to happen while cuda:1 is active."""
    from triton.runtime.interpreter import InterpretedFunction

    from weightkit.kernels import _shared, dictionary, galore, int4, int8, memoryformer, qgalore

    real_guard = _shared.device_guard
    asked = []

    def guard_as_cuda1(device):
        asked.append(device)
        return real_guard(torch.device("cuda", 1) if device.type == "cpu" else device)

    for mod in (int8, int4, dictionary, memoryformer, galore, qgalore):
        monkeypatch.setattr(mod, "device_guard", guard_as_cuda1)
    launches = []
    real_run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.__name__, fake_cuda.active))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    for name, call in _launcher_calls("cpu").items():
        asked.clear()
        launches.clear()
        fake_cuda.switches.clear()
        call()
        assert launches, f"{name}: no kernel launched"
        assert asked and all(d == torch.device("cpu") for d in asked), f"{name}: guard asked for {asked}"
        outside = [k for k, active in launches if active != 1]
        assert not outside, f"{name}: launched {outside} outside the device guard"
        assert fake_cuda.switches and set(fake_cuda.switches) == {1}, name


# -- launch plans ---------------------------------------------------------------------------------------------------

def test_compile_threads_setting(monkeypatch):
    from weightkit.kernels._shared import compile_threads

    monkeypatch.setenv("WEIGHTKIT_COMPILE_THREADS", "3")
    assert compile_threads() == 3
    monkeypatch.delenv("WEIGHTKIT_COMPILE_THREADS")
    assert 1 <= compile_threads() <= 16
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("WEIGHTKIT_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="WEIGHTKIT_COMPILE_THREADS"):
            compile_threads()


@pytest.mark.triton_kernels
def test_every_launcher_times_configs_with_the_short_benchmark():
    """Each autotuner (the Launchers' and GaLore's) times a config with _shared.tune_bench (5 + 25 ms), not Triton's
    default 25 + 100 ms: the GPU check's budgets pay for every config its tuners time."""
    import importlib

    from weightkit.kernels import _shared

    for mod in PER_OP:
        importlib.import_module(f"weightkit.kernels.{mod}")
    assert len(_shared.LAUNCHERS) >= 10
    assert all(launcher.autotuner.do_bench is _shared.tune_bench for launcher in _shared.LAUNCHERS)
    from weightkit.kernels import galore

    assert galore._matmul_update_kernel.do_bench is _shared.tune_bench  # the one triton.autotune outside a Launcher


@pytest.mark.triton_kernels
@needs_interpreter
def test_autotuner_runs_once_per_bucket_and_never_per_call(monkeypatch):
    """The tuned path: the autotuner is called on the first call of a (token bucket, shape, dtype, device) and never
    again; a new token count in the same power-of-two bucket gets a new plan from the cached config."""
    from weightkit.kernels import _shared, int8

    monkeypatch.setattr(int8, "TUNE_MIN_WEIGHT", 0)
    _shared.clear_launch_caches()
    gemv = int8._MATMUL.ops[False].gemv
    tuned = []
    real = gemv.autotuner.run

    def counting(*args, **kwargs):
        tuned.append(kwargs["M"] if "M" in kwargs else args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(gemv.autotuner, "run", counting)
    q = torch.randint(-128, 128, (64, 128), dtype=torch.int8)
    scale = torch.rand(64 * 2) + 0.5
    w = q.double() * scale.double().repeat_interleave(64).view(64, 128)
    for m, want_tunes in ((3, 1), (3, 1), (4, 1), (2, 2), (3, 2)):
        x = torch.randn(m, 128)
        y = int8.int8_matmul_triton(x, q, scale, 64, False)
        torch.testing.assert_close(y.double(), x.double() @ w.T, rtol=1e-4, atol=1e-3)
        assert len(tuned) == want_tunes, (m, tuned)
    assert len(gemv.plans) == 3 and len(gemv.chosen) == 2  # plans per exact M (2, 3, 4); configs per bucket (2, 4)
    plan = next(iter(gemv.plans.values()))
    assert isinstance(plan.grid, tuple) and plan.kwargs["SPLIT_K"] == 2  # the interpreter's one config


def test_plan_cache_is_bounded():
    from weightkit.kernels._shared import Plans

    plans = Plans()
    for i in range(Plans.LIMIT + 5):
        plans.put(i, i)
    assert len(plans) <= Plans.LIMIT and plans[Plans.LIMIT + 4] == Plans.LIMIT + 4


# -- int64 index arithmetic -----------------------------------------------------------------------------------------
# A tensor of >= 2^31 elements costs nothing here if the kernel touches a few of its pages: torch.empty reserves
# address space and the interpreter works on the tensors in place. With an int32 product the offsets wrap negative
# and the process reads or writes outside the tensor (a crash, or wrong values), hence a child process.

_BIG_OFFSETS = r"""
import json, torch
from weightkit.kernels import int4, int8
from weightkit.ops.int4 import dequantize_int4, quantize_int4
out = {}

# int8/int4 matmul with a strided x: element (m, k) at k * 2^27, past 2^31 for the last k (GEMV: 1 token, tensor
# cores: 5 tokens)
K, N, stride = 17, 8, 2**27
w = torch.randn(N, K)
q = torch.randint(-128, 128, (N, K), dtype=torch.int8)
scale = torch.rand(N * K) + 0.5
w8 = q.double() * scale.double().view(N, K)
packed, s4, z4 = quantize_int4(torch.randn(N, 18), 2)
w4 = dequantize_int4(packed, s4, z4, 2, (N, 18)).double()
for m in (1, 5):
    base = torch.empty((K - 1) * stride + m + 1, dtype=torch.float32)
    x = base.as_strided((m, K), (1, stride))
    x.copy_(torch.randn(m, K))
    y = int8.int8_matmul_triton(x, q, scale, 1, False)
    out[f"int8_matmul x stride 2^27, {m} tokens"] = bool(torch.allclose(y.double(), x.double() @ w8.T, rtol=1e-5,
                                                                        atol=1e-3))
    x4 = torch.empty((18 - 1) * stride + m + 1, dtype=torch.float32).as_strided((m, 18), (1, stride))
    x4.copy_(torch.randn(m, 18))
    y = int4.int4_matmul_triton(x4, packed, s4, z4, 2, N, 18, False)
    out[f"int4_matmul x stride 2^27, {m} tokens"] = bool(torch.allclose(y.double(), x4.double() @ w4.T, rtol=1e-5,
                                                                        atol=1e-3))

# memoryformer segment sum: sort_pairs' order is int32 where n K < 2^31, but a token's g row starts at token *
# d_out, past 2^31 here (n = 2^19 + 2 tokens of 4096 columns, K = 1); one table row's run holds tokens 3 and 2^19 + 1
from weightkit.kernels import memoryformer as km
n, d_out = 2**19 + 2, 4096
g = torch.empty(n, d_out)
tokens = [3, 2**19 + 1]
g[tokens] = torch.randn(2, d_out)
ps = torch.rand(n)
starts = torch.tensor([0, 2, 2], dtype=torch.int32)  # K = 1 table of 2 rows: row 0's run, row 1 empty
order = torch.tensor(tokens, dtype=torch.int32)
gt = torch.full((1, 2, d_out), float("nan"))
km._segment_rows_kernel[(1, d_out // 64)](starts, order, ps, g, gt, 2, 1, d_out, 1, ROWS=4, BLOCK_N=64, STAGES=1)
expect = torch.stack([ps[3] * g[3] + ps[tokens[1]] * g[tokens[1]], torch.zeros(d_out)])
out["memory segment sum, g row past 2^31, int32 order"] = bool(torch.allclose(gt[0], expect, rtol=1e-6, atol=1e-6))
print(json.dumps(out))
"""


@pytest.mark.triton_kernels
@needs_interpreter
def test_index_products_past_int32_run_in_int64():
    """Launches whose element offsets pass 2^31 (k * stride of a strided activation in the int8/int4 matmuls) reach
    the right elements. Before the offsets were made int64 they wrapped to a negative offset and crashed the
    process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _BIG_OFFSETS], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative offset?):\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results and all(results.values()), results


# -- compiled smoke without a GPU -----------------------------------------------------------------------------------
# The interpreter does not compile; Triton's compiler and its bundled ptxas run without a GPU. Each launch the
# launchers make is compiled for sm_90 instead of launched (outputs stay garbage; the launchers' host logic runs as
# usual, configs taken without timing), with the specialization Triton's launcher would give the arguments (16-byte
# divisibility of pointers and integers, integers equal to 1 as constants) and the GPU's dot operands (dot_meta).
# Catches what only the compiler sees (types, layouts, constexpr branches), and reads each cubin's registers, stack
# frame (spills) and shared memory (cuobjdump): a launch sm_90 would refuse, or a config that spills. Not timing:
# that needs a GPU.

def _tf32(allow, fn, *args):
    """fn(*args) with TF32 matmuls allowed or not (the fp32 kernels' PRECISION: "tf32" or "ieee")."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        return fn(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _compile_cases():
    """Launcher calls covering every jitted kernel and path (GEMV/tensor cores, transposes, aligned or not, dtypes,
    tuned and shape-rule configs, every per-op file: int8, int4, dictionary, memoryformer, galore, qgalore)."""
    from weightkit.kernels import dictionary, galore, int4, int8, memoryformer, qgalore
    from weightkit.ops.dictionary import index_dtype_for, pack_bitmask

    out = {}
    q = torch.randint(-128, 128, (256, 512), dtype=torch.int8)
    scale, scale8 = torch.rand(256 * 4) + 0.5, torch.rand(256 * 64) + 0.5
    packed, s4, z4 = torch.zeros(256 * 256, dtype=torch.uint8), torch.rand(256 * 8), torch.zeros(256 * 8).byte()
    odd = torch.zeros(255 * 250, dtype=torch.uint8), torch.rand(255 * 500 // 4), torch.zeros(255 * 500 // 4).byte()
    for dt, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
        for m in (1, 3, 16, 20, 50, 70):  # GEMV, decode tiles of 16 / 32 / 64 tokens, prefill
            if tf32 and m < 16:
                continue  # the GEMV has no dot
            tag = f"{dt}{' tf32' if tf32 else ''} m{m}"
            for t in (False, True):
                x = torch.randn(m, 256 if t else 512).to(dt)
                out[f"int8_matmul {tag} t{t} g128"] = lambda x=x, t=t, tf32=tf32: _tf32(
                    tf32, int8.int8_matmul_triton, x, q, scale, 128, t)
                out[f"int8_matmul {tag} t{t} g8"] = lambda x=x, t=t, tf32=tf32: _tf32(
                    tf32, int8.int8_matmul_triton, x, q, scale8, 8, t)
                out[f"int4_matmul {tag} t{t}"] = lambda x=x, t=t, tf32=tf32: _tf32(
                    tf32, int4.int4_matmul_triton, x, packed, s4, z4, 64, 256, 512, t)
                if dt == torch.bfloat16:  # GaLore's 16-bit projections: float32 out (exact products, or SPLIT3)
                    out[f"int4_matmul {tag} t{t} fp32 out"] = lambda x=x, t=t: int4.int4_matmul_triton(
                        x, packed, s4, z4, 64, 256, 512, t, out_dtype=torch.float32)
                    out[f"int4_matmul {tag} t{t} fp16 fp32 out"] = lambda x=x.half(), t=t: int4.int4_matmul_triton(
                        x, packed, s4, z4, 64, 256, 512, t, out_dtype=torch.float32)
                x = torch.randn(m, 255 if t else 500).to(dt)
                out[f"int4_matmul unaligned {tag} t{t}"] = lambda x=x, t=t, tf32=tf32: _tf32(
                    tf32, int4.int4_matmul_triton, x, *odd, 4, 255, 500, t)
                if dt == torch.bfloat16 and t:  # groups of 256: the 128-wide transposed tiles too
                    for x16 in (torch.bfloat16, torch.float16):
                        out[f"int4_matmul {tag} t{t} g256 {x16} fp32 out"] = lambda x=torch.randn(m, 256).to(x16): (
                            int4.int4_matmul_triton(x, packed, s4[:512], z4[:512], 256, 256, 512, True,
                                                    out_dtype=torch.float32))
                if dt == torch.bfloat16:
                    for x16 in (torch.bfloat16, torch.float16):
                        out[f"int4_matmul unaligned {tag} t{t} {x16} fp32 out"] = lambda x=x.to(x16), t=t: (
                            int4.int4_matmul_triton(x, *odd, 4, 255, 500, t, out_dtype=torch.float32))
    x = torch.randn(4, 1024)
    q8 = torch.zeros(4096, dtype=torch.int8)
    out["sr"] = lambda: int8.stochastic_round_int8_triton(x, torch.rand(32) + 0.5, 128, 1, 3)
    out["sr_update tiled"] = lambda: int8.int8_sr_update_triton(q8, torch.rand(32), torch.randn(4096), 128, 0.9, 1, 0)
    out["sr_update"] = lambda: int8.int8_sr_update_triton(q8, torch.rand(512), torch.randn(4096), 8, 0.9, 1, 1)
    # the optimizers' device-side skip: the stores masked by a loaded flag
    out["sr_update tiled flag"] = lambda: int8.int8_sr_update_triton(q8, torch.rand(32), torch.randn(4096), 128, 0.9,
                                                                     1, 0, torch.zeros(1))
    out["sr_update flag"] = lambda: int8.int8_sr_update_triton(q8, torch.rand(512), torch.randn(4096), 8, 0.9, 1, 1,
                                                               torch.zeros(1))
    out["quantize_int4"] = lambda: int4.quantize_int4_triton(x, 64)
    out["quantize_int4 group 24"] = lambda: int4.quantize_int4_triton(x[:, :960], 24)  # not a power of two: per group
    out["dequantize_int4"] = lambda: int4.dequantize_int4_triton(packed, s4, z4, 64)
    idx = torch.rand(200, 150).argsort(0)[:90]
    bitmask, values, offsets = pack_bitmask(idx.to(index_dtype_for(200)), torch.randn(90, 150), 200)
    for dt, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
        vals = values.to(dt)
        for m in (1, 3, 20, 50, 70):  # GEMV, decode tiles of 16 / 32 / 64 tokens, prefill
            z, g = torch.randn(m, 200).to(dt), torch.randn(m, 150).to(dt)
            tag = f"{dt}{' tf32' if tf32 else ''} m{m}"
            out[f"bitmask fwd {tag}"] = lambda z=z, v=vals, tf32=tf32: _tf32(
                tf32, dictionary.dict_bitmask_matmul_triton, z, v, bitmask, offsets)
            out[f"bitmask bwd {tag}"] = lambda z=z, g=g, v=vals, tf32=tf32: _tf32(
                tf32, dictionary.dict_bitmask_matmul_backward_triton, g, z, v, bitmask, offsets)
    for dt in (torch.bfloat16, torch.float32):
        # >= _TUNE_MIN_TABLE: the tuned path; 4 x 16 x 64: the shape rules
        for tables in (torch.randn(32, 256, 512).to(dt), torch.randn(4, 16, 64).to(dt)):
            K, d_out = tables.shape[0], tables.shape[2]
            for n in (1, 70):
                xm, g = torch.randn(n, K * 8).to(dt), torch.randn(n, d_out).to(dt)
                out[f"memory fwd {dt} K{K} n{n}"] = lambda xm=xm, t=tables: memoryformer.memory_lookup_forward_triton(
                    xm, t, 1.3)
                for det, seg in ((False, True), (True, True), (False, False)):  # sorted segments, or fp32 atomics
                    out[f"memory bwd {dt} K{K} n{n} det{det} seg{seg}"] = (
                        lambda xm=xm, t=tables, g=g, det=det, seg=seg: memoryformer.memory_lookup_backward_triton(
                            g, xm, t, 1.3, det, seg))
    for tau in (1, 10):  # the counting sort's smallest and largest one-hot blocks (B = 2 and 1024 buckets)
        hot = torch.randint(0, 2**tau, (70, 3)) + torch.arange(3) * 2**tau
        out[f"memory sort_pairs {2**tau} buckets"] = lambda k=hot.int(), b=2**tau: memoryformer.sort_pairs(k, b)
    for dt in (torch.float32, torch.float16):  # the projection's bf16 parts: a column block (strided) or a row block
        g = torch.randn(300, 2048).to(dt)
        out[f"bf16_parts {dt} dim0 strided"] = lambda g=g: galore.bf16_parts_triton(g[:, 512:1536], 0)
        out[f"bf16_parts {dt} dim1"] = lambda g=g: galore.bf16_parts_triton(g, 1)
    for wdt in (torch.float32, torch.bfloat16):
        for odt, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                          (torch.float16, False)):
            for left in (True, False):
                for flags in (False, True):
                    w = torch.randn(96, 80).to(wdt)
                    r = 16
                    low = torch.randn(r, 80) if left else torch.randn(96, r)
                    ortho = (torch.randn(96, r) if left else torch.randn(r, 80)).to(odt)
                    out[f"galore {wdt} {odt} tf32{tf32} left{left} flags{flags}"] = (
                        lambda w=w, low=low, ortho=ortho, left=left, flags=flags, tf32=tf32:
                        galore.galore_adam_update_triton(
                            w, low, torch.zeros_like(low), torch.zeros_like(low), ortho, left, 0.9, 0.999, 1e-8, 1e-2,
                            0.25, 1.0, found_inf=torch.zeros(1) if flags else None,
                            step_size_t=torch.ones(1) if flags else None, tf32=tf32))
                    # the write-back alone of a float32 direction (GaLoreAdamW8bit): with a 16-bit basis, mixed
                    # operand dtypes in the dot (the direction rounded in registers)
                    out[f"lowrank_update {wdt} {odt} tf32{tf32} left{left} flags{flags}"] = (
                        lambda w=w, low=low, ortho=ortho, left=left, flags=flags, tf32=tf32:
                        galore.lowrank_update_triton(
                            w, low, ortho, left, 1e-2, 0.25, 1.0, found_inf=torch.zeros(1) if flags else None,
                            step_size_t=torch.ones(1) if flags else None, tf32=tf32))
    for precision in ("fp32", "tf32x3", "bf16"):
        for left in (True, False):
            # RNG4 on / off; a basis of whole groups (packed-byte tiles) or not (gathered); a 512-column group
            for m, n, gs, offset, r, pg in ((96, 256, 64, 0, 24, 8), (96, 256, 128, 3, 24, 8),
                                            (96, 256, 128, 0, 20, 8 if left else 512), (32, 1024, 512, 0, 64, 64)):
                wq = torch.zeros(m, n, dtype=torch.int8)
                n_o = m * r if left else r * n  # the INT4 basis (weightkit.ops.int4's format)
                oq, osc, oz = torch.zeros(n_o // 2).byte(), torch.rand(n_o // pg), torch.zeros(n_o // pg).byte()
                upd = torch.randn(r, n) if left else torch.randn(m, r)
                for flags in (False, True):  # the optimizers' device flag and step size, or none
                    out[f"qgalore {precision} left{left} {m}x{n} g{gs} off{offset} r{r} pg{pg} flags{flags}"] = (
                        lambda wq=wq, oq=oq, osc=osc, oz=oz, upd=upd, left=left, gs=gs, offset=offset,
                        precision=precision, pg=pg, flags=flags: qgalore.int8_sr_lowrank_update_triton(
                            wq, torch.rand(wq.numel() // gs) + 0.5, oq, osc, oz, upd, gs, pg, left, 0.1, 0.99,
                            precision, 7, offset, torch.zeros(1) if flags else None,
                            torch.ones(()) if flags else None))
    # 'bf16x3' (SPLIT3) on bases of whole groups of >= 16: left, rank steps of one group; right, 1, 2, 4 or 8 groups
    # a tile row (BLOCK_N 128 / 256 / 512 over pg 64 and 256); the product kernel of the precision measurements
    for left in (True, False):
        for m, n, gs, r, pg in ((96, 256, 128, 64, 64), (96, 512, 256, 64, 64), (96, 512, 256, 64, 256),
                                (32, 1024, 512, 64, 64), (64, 256, 128, 128, 16)):
            wq = torch.zeros(m, n, dtype=torch.int8)
            n_o = m * r if left else r * n
            oq, osc, oz = torch.zeros(n_o // 2).byte(), torch.rand(n_o // pg), torch.zeros(n_o // pg).byte()
            upd = torch.randn(r, n) if left else torch.randn(m, r)
            for flags in (False, True):
                out[f"qgalore bf16x3 left{left} {m}x{n} g{gs} r{r} pg{pg} flags{flags}"] = (
                    lambda wq=wq, oq=oq, osc=osc, oz=oz, upd=upd, left=left, gs=gs, pg=pg, flags=flags:
                    qgalore.int8_sr_lowrank_update_triton(
                        wq, torch.rand(wq.numel() // gs) + 0.5, oq, osc, oz, upd, gs, pg, left, 0.1, 0.99, "bf16x3",
                        7, 0, torch.zeros(1) if flags else None, torch.ones(()) if flags else None))
            for precision in ("bf16x3", "tf32x3"):
                out[f"qgalore product {precision} left{left} {m}x{n} g{gs} r{r} pg{pg}"] = (
                    lambda oq=oq, osc=osc, oz=oz, upd=upd, left=left, m=m, n=n, gs=gs, pg=pg, precision=precision:
                    qgalore.lowrank_product_triton(oq, osc, oz, upd, pg, m, n, left, precision, gs))
    code_s, code_u = torch.linspace(-1, 1, 256), torch.linspace(0, 1, 256)
    for flag in (None, torch.zeros(1)):
        out[f"blockwise8bit_adam flag{flag is not None}"] = lambda flag=flag: qgalore.blockwise8bit_adam_triton(
            torch.randn(600), torch.zeros(600, dtype=torch.uint8), torch.rand(3) + 0.5,
            torch.zeros(600, dtype=torch.uint8), torch.rand(3) + 0.5, code_s, code_u, torch.empty(600), 0.9, 0.999,
            1e-8, flag)
    return out


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_gemv_pruner_keeps_the_group_rule(trans, wbits):
    """Every GEMV config the int8/INT4 pruner keeps for 1-4 tokens and each tuned group has its K step (resp. its N
    tile, transposed) inside one group, as the ALIGNED kernels assume, and a product tile of <= 64 values a thread.
    Before 2026-12-05 no INT4 tile fit 3-4 tokens and the pruner fell back to the space's first config, 128 wide
    across 64-groups: wrong results at g64 (found by tests/ops/test_config_sweep.py)."""
    from weightkit.kernels._shared import gemv_configs, make_gemv_pruner

    configs, prune = gemv_configs(trans, wbits), make_gemv_pruner(trans, wbits)
    for g in (64, 128, 256, 1024):
        for m in (1, 2, 3, 4):
            bm = next_pow2(m)
            kept = prune(configs, dict(N=4096, K=4096, G=g, x_ptr=torch.empty(1)), BLOCK_M=bm)
            assert kept, (g, m)
            for c in kept:
                bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
                assert g % (bn if trans else bk) == 0, (g, m, c)
                assert bm * bn * bk <= 64 * 32 * c.num_warps, (g, m, c)


@pytest.mark.parametrize("wbits", [8, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_mm_pruner_offers_split_x_tiles_only_to_a_float32_x_without_tf32(trans, wbits, monkeypatch):
    """The tensor-core pruner's kinds of tile (kernels/_shared._kind_fits): a float32 x without TF32 gets the FMA
    tiles and the SPLIT_X tiles that do not spill (_split_x_spills), for decode and prefill token counts; with
    FLOAT32_X_SPLIT off, the FMA tiles alone; a float32 x with TF32 and a bf16 x, neither (tensor-core tiles without
    SPLIT_X)."""
    from weightkit.kernels import _shared

    configs, prune = _shared.mm_configs(trans), _shared.make_mm_pruner(trans, wbits)

    def kinds(dtype, precision, m):
        kept = prune(configs, dict(M=m, N=4096, K=4096, G=128, x_ptr=torch.empty(1, dtype=dtype)),
                     PRECISION=precision)
        assert kept, (dtype, precision, m)
        assert not any(c.kwargs.get("SPLIT_X") and _shared._split_x_spills(c) for c in kept)
        return {"split" if c.kwargs.get("SPLIT_X") else "fma" if c.kwargs["BLOCK_K"] <= 32 else "tc" for c in kept}

    for m in (16, 64, 512):
        assert kinds(torch.float32, "ieee", m) == {"split", "fma"}, m
        assert kinds(torch.float32, "tf32", m) == kinds(torch.bfloat16, "ieee", m) == {"tc"}, m
        monkeypatch.setattr(_shared, "FLOAT32_X_SPLIT", False)
        assert kinds(torch.float32, "ieee", m) == {"fma"}, m
        monkeypatch.setattr(_shared, "FLOAT32_X_SPLIT", True)


SPACES = ("fixed", "tuned-first", "tuned-last", "tuned-all")
LAUNCHED_SPACES = ("fixed", "tuned-all")  # the configs a GPU launches for the cases' shapes: no resource faults


def _entry_kernels():
    """Every launched kernel of kernels/*.py (the module-level ``@triton.jit`` functions named ``*_kernel``, bare or
    under a ``triton.autotune``); the other jitted functions are helpers they call."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = set()
    for mod in ("_shared",) + PER_OP:
        for obj in vars(importlib.import_module(f"weightkit.kernels.{mod}")).values():
            for _ in range(3):  # an Autotuner (or Heuristics) wraps the JITFunction as .fn
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj.__name__.endswith("_kernel"):
                names.add(obj.__name__)
    return names


def _global_access(ptx):
    """Global memory instructions of a kernel's PTX by width, e.g. {"ld.v4.b32": 2, "ld.b8": 1, "st.v4.b32": 1,
    "cp.async.16B": 4}: how many bytes each load or store moves (16-byte vectors are what a bandwidth-bound kernel
    wants). Static counts (instructions in the code, not executions)."""
    import re
    from collections import Counter

    counts = Counter()
    for op, mods in re.findall(r"\b(ld|st|atom|red)\.global((?:\.[A-Za-z0-9_:]+)*)", ptx):
        kept = [m for m in mods.split(".") if m and (m.startswith("v") or m[0] in "bufs" and m[1:].isdigit())]
        counts[".".join([op] + kept)] += 1
    copy = r"cp\.async\.c[ag]\.shared(?:::[a-z]+)?\.global[^\[]*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    for size in re.findall(copy, ptx):
        counts[f"cp.async.{int(size, 0)}B"] += 1  # pipelined loads into shared memory, by bytes
    return dict(counts)


def _cuobjdump():
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return tool if os.path.exists(tool) else None


def _resource_usage(cubin):
    """Registers per thread, stack frame (bytes per thread: register spills, as Triton allocates no local arrays)
    and static shared memory of a compiled kernel, read from its cubin by the cuobjdump Triton bundles (no GPU
    needed); {} when that tool is missing."""
    import re
    import tempfile

    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return {}
    regs, stack, static_shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_shared=static_shared, local=local)


def _compile_every_launch(space, cases=None):
    """Run _compile_cases (those whose name matches the regular expression ``cases``, all by default) with
    JITFunction.run compiling for sm_90; returns one dict per distinct compile, and one failed entry per launched
    kernel (_entry_kernels) that no case reached (when all cases run).

    Configs: the launchers' shape rules where they use them ("fixed"; tuned launches take the first config of the
    space), or the tuners' spaces wherever a launcher can tune: their first ("tuned-first") or last ("tuned-last")
    config, or every config the tuner's pruner keeps for the case's shape ("tuned-all": what a GPU run compiles and
    times). The autotuner's run is replaced (no timing: it needs a GPU), so both the Launchers' module-level
    autotuners and the kernels decorated with ``triton.autotune`` (galore) go through it. Works with Triton 3.6 and
    3.9 (JITFunction.run(*args, grid, warmup, **kwargs), Autotuner.run / prune_configs / nargs / best_config,
    ASTSource(fn, signature, constexprs) and GPUTarget are the same in both)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from weightkit.kernels import _shared, dictionary, galore, int4, int8

    assert not _shared.INTERPRET, "compiles only without TRITON_INTERPRET"
    assert space in SPACES, space
    seen, results = set(), []

    def compile_run(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
        for k in ("num_ctas", "maxnreg", "ir_override"):
            kwargs.pop(k, None)
        bound = dict(zip(self.arg_names, args), **kwargs)
        sig, cons, attrs = {}, {}, {}
        for i, p in enumerate(self.params):  # Triton's own specialization (JITFunction.run's binder)
            v = bound.get(p.name, p.default)
            if p.is_constexpr:
                sig[p.name], cons[p.name] = "constexpr", v
                continue
            ty, attr = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            if isinstance(v, (bool, float)) or p.do_not_specialize:
                attr = None  # Triton does not specialize floats, bools or do_not_specialize arguments
                ty = "i32" if ty == "constexpr" else ty
            sig[p.name] = ty
            if ty == "constexpr":  # an integer equal to 1
                cons[p.name] = attr
            elif isinstance(attr, str) and CUDABackend.parse_attr(attr):
                attrs[(i,)] = CUDABackend.parse_attr(attr)
        key = (self.__name__, str(sorted(sig.items())), str(sorted(cons.items())), str(sorted(attrs.items())),
               str(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            t0 = time.time()
            try:
                k = triton.compile(ASTSource(self, sig, cons, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
                results.append(dict(kernel=self.__name__, ok=True, shared=k.metadata.shared,
                                    num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                                    constexprs=str(cons), tensors=" ".join(v for v in sig.values() if v[0] == "*"),
                                    global_access=_global_access(k.asm["ptx"]), **_resource_usage(k.asm["cubin"]),
                                    seconds=round(time.time() - t0, 1)))
            except Exception as e:  # noqa: BLE001
                results.append(dict(kernel=self.__name__, ok=False, constexprs=str(cons), options=str(opts),
                                    error=f"{type(e).__name__}: {str(e)[-1500:]}"))

    def untimed_run(self, *args, **kwargs):  # Autotuner.run without timing: compiles the space's chosen configs
        self.nargs = dict(zip(self.arg_names, args))
        if space == "tuned-all":
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        else:
            configs = [self.configs[-1 if space == "tuned-last" else 0]]
        for cfg in configs:
            self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        self.best_config = configs[0]
        self.nargs = None

    JITFunction.run = compile_run
    Autotuner.run = untimed_run
    # the GPU's operands: on CPU tensors dot_meta gives bf16 dots fp32 operands (for the interpreter)
    _shared.dot_meta = dictionary.dot_meta = lambda device, dtype, precision: dict(PRECISION=precision)
    if space != "fixed":  # the tuners' config spaces instead of the shape rules
        int8.TUNE_MIN_WEIGHT = int4.TUNE_MIN_WEIGHT = dictionary.TUNE_MIN_WEIGHT = galore.PARTS_TUNE_MIN = 0
    import re

    for name, call in _compile_cases().items():
        if cases and not re.search(cases, name):
            continue
        try:
            call()
        except Exception as e:  # noqa: BLE001
            results.append(dict(kernel=name, ok=False, error=f"launcher: {type(e).__name__}: {e}"))
    compiled = {r["kernel"] for r in results}
    for name in sorted(_entry_kernels() - compiled if not cases else ()):
        results.append(dict(kernel=name, ok=False, error="no case of _compile_cases launches it"))
    return results


SM90_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB): more fails at launch
SPILL_BYTES = 64  # a stack frame beyond this is register spills (Triton kernels hold no local arrays)


def resource_faults(results):
    """The compiled launches that could not launch on an H100/H200 (shared memory) or spill registers to local
    memory (each spilled value a round trip through L1/L2 per use: the kernel runs at a fraction of its design)."""
    return [r for r in results if r["ok"] and (r["shared"] + r.get("static_shared", 0) > SM90_SHARED
                                               or r.get("stack", 0) > SPILL_BYTES)]


@pytest.mark.triton_kernels
@pytest.mark.parametrize("space", ["fixed", pytest.param("tuned-first", marks=pytest.mark.slow),
                                   pytest.param("tuned-last", marks=pytest.mark.slow)])
def test_every_launch_compiles_for_sm90(space):
    """Every kernel each launcher launches compiles for sm_90 (the fixed shape-rule configs, or the first / last
    config of each tuner's space), with the installed Triton, no GPU needed; every launched kernel of kernels/ is
    reached. The fixed configs must fit sm_90's shared memory and spill no registers (cuobjdump's resource usage of
    each cubin): they are launched without timing, so nothing on the GPU steers around a bad one. The same holds for
    "tuned-all", every config each pruner keeps for the cases' shapes (a tuned config that spills costs autotuning
    time in the GPU window); it takes about 10 minutes, so scripts/check_triton.sh runs it, under Triton 3.6 by
    default. The first / last config of a space may be one its pruner never keeps for the case's shape (e.g. a GEMV
    tile too large for 4 tokens): those spaces check only that it compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile", space], capture_output=True,
                          text=True, env=env, timeout=3000, cwd=ROOT)
    results = json.loads(proc.stdout.strip().splitlines()[-1])  # (exit status 1 when a compile failed)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    failed = [r for r in results if not r["ok"]]
    assert results and not failed, json.dumps(failed, indent=1)[:6000]
    assert any("regs" in r for r in results) or not _cuobjdump(), "no resource usage read from the cubins"
    if space in LAUNCHED_SPACES:
        faults = resource_faults(results)
        assert not faults, json.dumps(faults, indent=1)[:6000]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile every Triton launch for sm_90 (no GPU needed)")
    parser.add_argument("--compile", choices=SPACES, required=True)
    parser.add_argument("--cases", help="only the cases whose name matches this regular expression, e.g. bitmask")
    cli = parser.parse_args()
    space = cli.compile
    results = _compile_every_launch(space, cli.cases)
    print(json.dumps(results))
    import triton

    failed = [r for r in results if not r["ok"]]
    faults = resource_faults(results)
    print(f"sm_90 compile, Triton {triton.__version__}, {space}: {len(results) - len(failed)}/{len(results)} "
          f"compiles ok, {len({r['kernel'] for r in results})} kernels; {len(faults)} spill registers or exceed "
          f"sm_90's shared memory", file=sys.stderr)
    for r in faults:
        print(f"  resources: {r['kernel']} warps {r['num_warps']} regs {r.get('regs')} stack {r.get('stack')} "
              f"shared {r['shared']} {r['tensors']} {r['constexprs'][:160]}", file=sys.stderr)
    for r in failed:
        print(json.dumps(r)[:3000], file=sys.stderr)
    sys.exit(1 if failed or not results or (space in LAUNCHED_SPACES and faults) else 0)
