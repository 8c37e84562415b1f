"""The Triton int8_matmul / int4_matmul kernels (weightkit.kernels.int8, weightkit.kernels.int4) against a float64
reference: both kernels (GEMV for <= 4 tokens, tensor-core GEMM above), both transposes, tails on M, N and K, group
sizes that do and do not divide the tiles, split-K, the fixed-config and the autotuned launch, fp32/bf16/fp16 x.

Error bound: |y - ref| <= tol * (|x| @ |W|^T), the scale of the dot's terms (covers the output's rounding and the
fp32 accumulation; exact-zero rows stay exact). On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import os

import pytest
import torch

from tests.conftest import DEVICES, assert_quantized_matmul_contract
from weightkit.ops.int4 import dequantize_int4, quantize_int4
from weightkit.ops.int8 import absmax_scale, dequantize_int8

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton_kernels

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOKENS = [1, 3, 16, 17, 70]
# (out/rows, in/cols, group, path): group 8 divides no tensor-core tile (per-element scales); group 128 with the
# fixed config and with the autotuner (its configs, one per tuner under the interpreter, split K in two)
SHAPES = [(96, 200, 8, "fixed"), (256, 512, 128, "fixed"), (256, 512, 128, "tuned")]


def _check(y, x, w64, transpose, dtype, label):
    ref = x.double() @ (w64 if transpose else w64.T)
    bound = x.double().abs() @ (w64.abs() if transpose else w64.abs().T)
    assert y.dtype == dtype and y.shape == ref.shape, label
    assert bool(torch.isfinite(y).all()), f"{label}: non-finite output"
    err = (y.double() - ref).abs()
    worst = float((err - TOL[dtype] * bound).max())
    assert worst <= 0, f"{label}: max |err| {float(err.max()):.3g} exceeds {TOL[dtype]} * sum|x||w|"


def _cases(device):
    for rows, cols, group, path in SHAPES:
        if device == "cuda" and path == "tuned":  # compiled autotuning is slow: a smoke subset on the GPU
            yield from (pytest.param(rows, cols, group, path, m, dt, id=f"{rows}x{cols}-g{group}-{path}-m{m}-{dt}")
                        for m in (1, 16, 70) for dt in (torch.bfloat16,))
            continue
        dtypes = list(TOL)
        for i, m in enumerate(TOKENS):  # the 8-group shape with every dtype; the larger ones rotate the dtype
            for dt in dtypes if group == 8 else [dtypes[(i + (path == "tuned")) % 3]]:
                yield pytest.param(rows, cols, group, path, m, dt, id=f"{rows}x{cols}-g{group}-{path}-m{m}-{dt}")


# Triton runs CPU tensors only through the interpreter (TRITON_INTERPRET=1, set by conftest without a GPU); on a
# GPU machine the kernels are tested on cuda.
TRITON_DEVICES = [d for d in DEVICES if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"]


def _params():
    out = []
    for device in TRITON_DEVICES:
        for p in _cases(device):
            out.append(pytest.param(device, *p.values, id=f"{device}-{p.id}",
                                    marks=[pytest.mark.cuda] if device == "cuda" else []))
    return out


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("device,rows,cols,group,path,tokens,dtype", _params(), indirect=False)
def test_int8_matmul_triton(device, rows, cols, group, path, tokens, dtype, transpose, monkeypatch):
    from weightkit.kernels import int8 as k8

    monkeypatch.setattr(k8, "TUNE_MIN_WEIGHT", 0 if path == "tuned" else 1 << 62)
    w = torch.randn(rows, cols, device=device)
    scale = absmax_scale(w, group)
    q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=device)
    w64 = dequantize_int8(q, scale, group).double()
    x = torch.randn(tokens, rows if transpose else cols, device=device).to(dtype)
    y = k8.int8_matmul_triton(x, q, scale, group, transpose)
    _check(y, x, w64, transpose, dtype, f"int8 {path} {tokens}x{rows}x{cols} g{group} t={transpose}")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("device,rows,cols,group,path,tokens,dtype", _params(), indirect=False)
def test_int4_matmul_triton(device, rows, cols, group, path, tokens, dtype, transpose, monkeypatch):
    from weightkit.kernels import int4

    monkeypatch.setattr(int4, "TUNE_MIN_WEIGHT", 0 if path == "tuned" else 1 << 62)
    w = torch.randn(rows, cols, device=device)
    packed, scale, zero = quantize_int4(w, group)
    w64 = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
    x = torch.randn(tokens, rows if transpose else cols, device=device).to(dtype)
    y = int4.int4_matmul_triton(x, packed, scale, zero, group, rows, cols, transpose)
    _check(y, x, w64, transpose, dtype, f"int4 {path} {tokens}x{rows}x{cols} g{group} t={transpose}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tokens", [2, 9])
def test_int4_groups_across_rows_and_strided_x(device, transpose, tokens):
    """cols % group != 0 (groups and bytes straddle rows: the per-element path) and a transposed-view x."""
    from weightkit.kernels import int4

    rows, cols, group = 8, 6, 4
    w = torch.randn(rows, cols, device=device)
    packed, scale, zero = quantize_int4(w, group)
    w64 = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
    x = torch.randn(rows if transpose else cols, tokens, device=device).T  # strides (1, tokens)
    y = int4.int4_matmul_triton(x, packed, scale, zero, group, rows, cols, transpose)
    _check(y, x, w64, transpose, torch.float32, f"int4 strided t={transpose}")


def _weight(fmt, rows, cols, group, device):
    """(the kernel's weight arguments, the dequantized weight in float64) of a random int8 / INT4 weight."""
    if fmt == "int8":
        q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=device)
        scale = absmax_scale(torch.randn(rows, cols, device=device), group)
        return (q, scale), dequantize_int8(q, scale, group).double()
    packed = quantize_int4(torch.randn(rows, cols, device=device), group)
    return (*packed, cols // 2), dequantize_int4(*packed, group, (rows, cols)).double()


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("transpose", [False, True])
def test_float32_x_without_tf32_is_split_for_the_tensor_cores(device, fmt, transpose, monkeypatch):
    """A float32 x with TF32 not allowed (torch's default) on the tensor-core kernel (70 tokens, the shape rules'
    config): SPLIT_X, x's tiles in three bf16 parts times the weight's integers (kernels/_shared.split_x_dot), the
    transposed weight's per-k scales folded into x, within the float32 contract; FLOAT32_X_SPLIT=False keeps the FMA
    dots, also within it, with other bits (each path ran); an infinite x gives the float64 reference's infinities
    and NaNs (inf times a zero weight), not NaN parts."""
    from weightkit.backend import allow_tf32
    from weightkit.kernels import _shared, int4, int8 as k8

    mod = k8 if fmt == "int8" else int4
    monkeypatch.setattr(mod, "TUNE_MIN_WEIGHT", 1 << 62)
    rows, cols, group = 128, 256, 64
    n, k = (cols, rows) if transpose else (rows, cols)
    wargs, w64 = _weight(fmt, rows, cols, group, device)
    x = torch.randn(70, k, device=device)

    def run(x, split):
        monkeypatch.setattr(_shared, "FLOAT32_X_SPLIT", split)
        y = torch.empty(x.shape[0], n, device=device)
        with allow_tf32(False):
            mod._MATMUL(x, wargs, y, n, k, group, transpose, aligned=True)
        chosen = mod._MATMUL.ops[transpose].mm.chosen
        key = (128,) + mod._MATMUL.plan_key(x, y, n, k, group, True, False)[1:]  # the bucket: M to a power of 2
        assert bool(chosen[key].kwargs.get("SPLIT_X")) == split, chosen[key]
        return y

    split, fma = run(x, True), run(x, False)
    assert_quantized_matmul_contract(split, x, w64, transpose, f"{fmt} split x")
    assert_quantized_matmul_contract(fma, x, w64, transpose, f"{fmt} fma")
    assert not torch.equal(split, fma)
    x[3, 5], x[60, 9] = float("inf"), float("-inf")
    ref = x.double() @ (w64 if transpose else w64.T)
    y = run(x, True)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.equal(y[torch.isinf(ref)], ref[torch.isinf(ref)].float())
    fin = torch.ones(70, dtype=torch.bool)
    fin[[3, 60]] = False
    assert_quantized_matmul_contract(y[fin], x[fin], w64, transpose, f"{fmt} split x, finite rows")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty_and_tiny(device):
    from weightkit.kernels import int8 as k8

    q = torch.randint(-128, 128, (3, 16), dtype=torch.int8, device=device)
    scale = absmax_scale(torch.randn(3, 16, device=device), 16)
    assert k8.int8_matmul_triton(torch.randn(0, 16, device=device), q, scale, 16, False).shape == (0, 3)
    x = torch.randn(1, 3, device=device)
    w64 = dequantize_int8(q, scale, 16).double()
    _check(k8.int8_matmul_triton(x, q, scale, 16, True), x, w64, True, torch.float32, "1 x 3 x 16")


def test_autotuners_are_module_level():
    """bench/gpu_report.py prints every triton Autotuner found in weightkit.kernels modules."""
    from weightkit.kernels import int4, int8 as k8

    for mod, names in ((k8, ("int8_gemv_autotune", "int8_gemv_t_autotune", "int8_mm_autotune",
                                "int8_mm_t_autotune")),
                       (int4, ("int4_gemv_autotune", "int4_gemv_t_autotune", "int4_mm_autotune",
                               "int4_mm_t_autotune"))):
        for name in names:
            assert isinstance(getattr(mod, name), triton.runtime.Autotuner), name


def _launch_with_split(mod, x, wargs, n, k, group, transpose, split):
    """One int8/int4 matmul launch through the op's SplitKMatmul with its fixed config, SPLIT_K forced to ``split``
    (the plan and config caches are keyed by the split too)."""
    from weightkit.kernels._shared import config

    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    key = mod._MATMUL.plan_key(x, y, n, k, group, True, False)

    def setup(gemv):
        meta, cfg, bucket = mod._MATMUL._setup(gemv, key, transpose)
        return meta, config(cfg.num_warps, cfg.num_stages, **dict(cfg.kwargs, SPLIT_K=split)), bucket + (split,)

    return mod._MATMUL.ops[transpose](key + ("split", split), (x, *wargs), y,
                                      (x.shape[0], n, k, group, x.stride(0), x.stride(1)), x.shape[0], n, setup)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_split_k_reduces_in_the_same_launch(device, fmt, transpose, tokens, monkeypatch):
    """Split-K in one launch (kernels/_shared.splitk_finish): for SPLIT_K 1, 3 (uneven splits) and 8 (empty ones with the transpose), the GEMV
    (1 and 3 tokens) and the tensor-core kernel (16 tokens) launch one kernel per call, the result is within the
    precision contract, a repeated call gives the same bits (the sum runs in split order, whoever arrives last), a
    call with new inputs gives the new result (the arrival counters were reset: stale counts would leave y
    unwritten) and the counters are all zero after each call."""
    from weightkit.kernels import _shared, int4, int8 as k8

    rows, cols, group = 128, 512, 64
    n, k = (cols, rows) if transpose else (rows, cols)
    mod = k8 if fmt == "int8" else int4
    wargs, w64 = _weight(fmt, rows, cols, group, device)
    launches = []
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        real_run = InterpretedFunction.run

        def counting_run(self, *args, **kwargs):
            launches.append(self.__name__)
            return real_run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    for split in (1, 3, 8):
        x = torch.randn(tokens, k, device=device)
        launches.clear()
        y = _launch_with_split(mod, x, wargs, n, k, group, transpose, split)
        assert device != "cpu" or len(launches) == 1, (split, launches)
        assert_quantized_matmul_contract(y, x, w64, transpose, f"{fmt} split {split}")
        again = _launch_with_split(mod, x, wargs, n, k, group, transpose, split)
        assert torch.equal(again, y), f"split {split}: a repeated call differs"
        x2 = torch.randn(tokens, k, device=device)
        assert_quantized_matmul_contract(_launch_with_split(mod, x2, wargs, n, k, group, transpose, split), x2, w64,
                                         transpose, f"{fmt} split {split}, new inputs")
        for _, counters in _shared.SCRATCH.buffers.values():
            assert not bool(counters.any()), f"split {split}: arrival counters left non-zero"
    assert any(key[0] == torch.device(device) for key in _shared.SCRATCH.buffers)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 16])
def test_split_k_launch_replays_in_a_cuda_graph(tokens, monkeypatch):
    """A SPLIT_K 4 launch (one kernel: partials, arrival counters, the last program's sum) captured in a CUDA graph
    and replayed with new inputs gives the eager result each time (the counters are back at zero after every replay);
    captured on torch.cuda.graph's own stream after an eager call, it takes SplitScratch's capture buffers, zeroed
    before the capture: the graph holds the kernel alone."""
    from weightkit.kernels import _shared, int8 as k8

    rows, cols, group = 512, 2048, 128
    handed = []
    real_get = _shared.SCRATCH.get
    monkeypatch.setattr(_shared.SCRATCH, "get", lambda *a: handed.append(real_get(*a)) or handed[-1])
    q = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device="cuda")
    scale = absmax_scale(torch.randn(rows, cols, device="cuda"), group)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    _launch_with_split(k8, x, (q, scale), rows, cols, group, False, 4)  # eager first: plan and scratch exist
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _launch_with_split(k8, x, (q, scale), rows, cols, group, False, 4)
    assert handed[-1] is _shared.SCRATCH.buffers[(x.device, "capture")]
    for _ in range(3):
        x.copy_(torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        eager = _launch_with_split(k8, x.clone(), (q, scale), rows, cols, group, False, 4)
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
