"""Every weightkit op the way serving stacks run decode: captured in a CUDA graph and replayed, and on a stream that
is not the default one (CUDA only).

* Graph: one eager call outside the capture (it compiles and autotunes the Triton kernels, which must not happen
  during a capture), then one call captured in a torch.cuda.CUDAGraph. New inputs are copied into the captured
  input tensors and the graph replayed, twice with different inputs: each replay equals an eager call on the same
  inputs. An op that syncs with the host, allocates from the host or bakes an input's values into the launch fails
  here.
* Stream: a producer stream sleeps on the GPU (torch.cuda._sleep) and then writes the op's inputs; a consumer stream
  waits for it (wait_stream) and runs the op, then copies the outputs on the same stream. Before the producer's
  write the input tensors hold other valid inputs, so a kernel launched on any stream but the current one (the
  legacy default stream, a cached stream) reads those and gives the other result. Same result as eager required.

Each op of ``torch.ops.weightkit`` (those that weightkit.ops define: the extension's ``*_kernel`` ops are the
backends' business) needs a case here: ``test_every_op_has_a_case`` fails otherwise, on CPU too. Each case runs with
every backend that can run it on CUDA (cuda, triton; the reference is the spec, not a serving path). The two input
sets of a case must give different results (checked), so that a stale read cannot pass.
"""

import os

import pytest
import torch

from weightkit import backend, use_backend
from weightkit.ops.dictionary import pack_bitmask
from weightkit.ops.int4 import quantize_int4
from weightkit.ops.int8 import absmax_scale, stochastic_round_int8

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
SLEEP_CYCLES = 50_000_000  # ~25 ms of GPU time at ~2 GHz: far longer than launching the op takes


def _randn(*shape, device, scale=1.0):
    return torch.randn(*shape, device=device) * scale


def _int8_weight(rows, cols, group, device):
    w = _randn(rows, cols, device=device)
    scale = absmax_scale(w, group)
    return stochastic_round_int8(w, scale, group, seed=3), scale


def _int4(rows, cols, group, device):
    return quantize_int4(_randn(rows, cols, device=device), group)


def _galore(device, left, m=128, n=96, r=16):
    low_shape = (r, n) if left else (m, r)
    ortho = torch.linalg.qr(_randn(m if left else n, r, device=device))[0]
    ortho = ortho if left else ortho.T.contiguous()
    return (_randn(m, n, device=device), _randn(*low_shape, device=device),
            _randn(*low_shape, device=device, scale=0.1), torch.rand(low_shape, device=device) * 0.1, ortho, left,
            0.9, 0.999, 1e-6, 1e-2, 0.5, 0.99)


def _tables(k, tau, d_out, device):
    return _randn(k, 2**tau, d_out, device=device, scale=0.1)


def _adam8(n, device):
    """8-bit blockwise moments (blocks of 256) with sorted code tables of 256 values (any such table is a valid
    call; bitsandbytes' dynamic maps are one, not needed here)."""
    code_signed = torch.linspace(-1.0, 1.0, 256, device=device)
    code_unsigned = torch.linspace(0.0, 1.0, 256, device=device)
    blocks = -(-n // 256)
    q = [torch.randint(0, 256, (n,), dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.rand(blocks, device=device) + 0.5 for _ in range(2)]
    return (_randn(n, device=device), q[0], absmax[0], q[1], absmax[1], code_signed, code_unsigned,
            torch.empty(n, device=device), 0.9, 0.999, 1e-6)


def _bitmask(tokens, device, k=80, s=7, d_out=72):  # k = 80: three 32-bit mask words per column
    idx = torch.rand(k, d_out, device=device).argsort(0)[:s].to(torch.uint8)
    bitmask, values, word_offsets = pack_bitmask(idx, _randn(s, d_out, device=device), k)
    return _randn(tokens, k, device=device), values, bitmask, word_offsets


# op name -> {case id: device -> the op's arguments}. Decode sizes (1 token) and a small batch where the kernels
# take another path (GEMV vs tiles); in-place ops mutate the arguments their schema marks (a!).
CASES = {
    "stochastic_round_int8": {
        "64x256-g64": lambda d: (lambda x: (x, absmax_scale(x, 64), 64, 7, 3))(_randn(64, 256, device=d))},
    "int8_sr_update_": {
        "64x256-g64": lambda d: (*_int8_weight(64, 256, 64, d), _randn(64, 256, device=d, scale=0.05), 64, 0.99, 11,
                                 5)},
    "int8_matmul": {
        "1tok": lambda d: (_randn(1, 512, device=d), *_int8_weight(256, 512, 64, d), 64, False),
        "40tok": lambda d: (_randn(40, 512, device=d), *_int8_weight(256, 512, 64, d), 64, False),
        "40tok-transpose": lambda d: (_randn(40, 256, device=d), *_int8_weight(256, 512, 64, d), 64, True),
        # 1M weights: the autotuned Triton launch (split K in the same launch where the tuner splits)
        "1tok-1024x1024-tuned": lambda d: (_randn(1, 1024, device=d), *_int8_weight(1024, 1024, 128, d), 128, False),
        "16tok-1024x1024-tuned": lambda d: (_randn(16, 1024, device=d), *_int8_weight(1024, 1024, 128, d), 128,
                                            False)},
    "quantize_int4": {"128x256-g64": lambda d: (_randn(128, 256, device=d), 64)},
    "dequantize_int4": {"128x256-g64": lambda d: (*_int4(128, 256, 64, d), 64, [128, 256])},
    "int4_matmul": {
        "1tok": lambda d: (_randn(1, 256, device=d), *_int4(128, 256, 64, d), 64, [128, 256], False),
        "40tok": lambda d: (_randn(40, 256, device=d), *_int4(128, 256, 64, d), 64, [128, 256], False),
        "40tok-transpose": lambda d: (_randn(40, 128, device=d), *_int4(128, 256, 64, d), 64, [128, 256], True),
        "1tok-1024x1024-tuned": lambda d: (_randn(1, 1024, device=d), *_int4(1024, 1024, 64, d), 64, [1024, 1024],
                                           False),
        # GaLore's projections of a bf16 gradient: float32 out (right: exact products; left, transposed: SPLIT3)
        "40tok-bf16-float32-out": lambda d: (_randn(40, 256, device=d).bfloat16(), *_int4(128, 256, 64, d), 64,
                                             [128, 256], False, torch.float32),
        "40tok-bf16-float32-out-transpose": lambda d: (_randn(40, 128, device=d).bfloat16(), *_int4(128, 256, 64, d),
                                                       64, [128, 256], True, torch.float32),
        # an fp16 gradient's left projection: its tile in two bf16 parts too (SPLIT3, five products)
        "40tok-fp16-float32-out-transpose": lambda d: (_randn(40, 128, device=d).half(), *_int4(128, 256, 64, d),
                                                       64, [128, 256], True, torch.float32)},
    "galore_adam_update_": {"left": lambda d: _galore(d, left=True), "right": lambda d: _galore(d, left=False)},
    # its write-back alone, of a direction (GaLoreAdamW8bit's one-pass 8-bit moments): weight, U, P, left, step...
    "lowrank_update_": {side: (lambda d, left=left: (lambda a: (a[0], a[2], a[4], left, 1e-2, 0.5, 0.99))(
        _galore(d, left=left))) for side, left in (("left", True), ("right", False))},
    "memory_lookup_forward": {
        "1tok": lambda d: (_randn(1, 64, device=d), _tables(16, 4, 128, d), 1.0),
        "40tok": lambda d: (_randn(40, 64, device=d), _tables(16, 4, 128, d), 0.5),
        # 2^22 table elements: the autotuned Triton launch
        "4tok-tuned": lambda d: (_randn(4, 1024, device=d), _tables(128, 8, 128, d), 1.0)},
    "memory_lookup_backward": {
        "40tok": lambda d: (_randn(40, 128, device=d), _randn(40, 64, device=d), _tables(16, 4, 128, d), 1.0, False),
        "40tok-deterministic": lambda d: (_randn(40, 128, device=d), _randn(40, 64, device=d), _tables(16, 4, 128, d),
                                          1.0, True)},
    "int8_sr_lowrank_update_": {
        "left-g32": lambda d: (*_int8_weight(128, 96, 32, d), *_int4(128, 16, 16, d), _randn(16, 96, device=d), 32,
                               16, True, 0.1, 0.99, "fp32", 7, 0),
        "right-g32": lambda d: (*_int8_weight(96, 128, 32, d), *_int4(16, 128, 16, d), _randn(96, 16, device=d), 32,
                                16, False, 0.1, 0.99, "fp32", 7, 0)},
    "blockwise8bit_adam_": {"600": lambda d: _adam8(600, d)},
    # the projection's bf16 parts: a float32 gradient's column block (strided), an fp16 one's rows
    "bf16_parts": {"float32-dim0-strided": lambda d: (_randn(64, 256, device=d)[:, 32:160], 0),
                   "float16-dim1": lambda d: (_randn(48, 96, device=d).half(), 1)},
    "dict_bitmask_matmul": {"1tok": lambda d: _bitmask(1, d), "40tok": lambda d: _bitmask(40, d)},
    "dict_bitmask_matmul_backward": {"40tok": lambda d: (_randn(40, 72, device=d), *_bitmask(40, d))},
}


def public_ops():
    """The weightkit:: ops defined through weightkit.ops._registry.define (the extension's are ``*_kernel``)."""
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("weightkit::")]
    return sorted(n for n in names if not n.endswith("_kernel"))


# Ops that are not for serving and cannot replay: each says why (a case here would test what the op does not promise).
NOT_REPLAYABLE = {
    "int8_assign_sr_": "the write-back of an optimizer's in-place update to an Int8Linear weight (weightkit.nn.int8) "
                       "reads its [seed, count] state on the host at every call, so a replay would repeat the "
                       "captured call's noise; it runs in optimizer steps, never in a captured forward",
}


def test_every_op_has_a_case():
    missing = sorted(set(public_ops()) - set(CASES) - set(NOT_REPLAYABLE))
    stale = sorted((set(CASES) | set(NOT_REPLAYABLE)) - set(public_ops()))
    assert not missing, f"ops with no CUDA-graph / stream case in tests/test_cuda_graphs.py: {missing}"
    assert not stale, f"cases for ops that no longer exist: {stale}"


def _params():
    return [pytest.param(name, case, id=f"{name}-{case}", marks=cuda_only)
            for name in sorted(CASES) for case in CASES[name]]


def _overload(name):
    return getattr(torch.ops.weightkit, name).default


def _mutated(name):
    return [i for i, a in enumerate(_overload(name)._schema.arguments) if a.alias_info is not None
            and a.alias_info.is_write]


def _backends(name):
    """The serving backends of the op that can run on this CUDA device ("auto" when the op has no table)."""
    tables = {t.name: t for t in backend._TABLES}
    if name not in tables:
        return ["auto"]
    device = torch.device("cuda")
    return [b for b in ("cuda", "triton") if tables[name].why_not(b, device) is None]


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _copy_into(dst, src):
    for d, s in zip(dst, src):
        if isinstance(d, torch.Tensor):
            assert d.shape == s.shape and d.dtype == s.dtype, "the two input sets of a case must match in shape"
            d.copy_(s)


def _outputs(name, result, args):
    outs = list(result) if isinstance(result, (tuple, list)) else ([] if result is None else [result])
    return outs + [args[i] for i in _mutated(name)]


def _eager(name, args):
    args = _clone(args)
    return [o.clone() for o in _outputs(name, _overload(name)(*args), args)]


def _assert_same(got, expected, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        if e.is_floating_point():
            # same kernels, same inputs: equal up to the order of atomic additions (the backward ops)
            tol = 1e-5 if e.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m: f"{what}, output {i}: {m}")
        else:
            assert torch.equal(g, e), f"{what}, output {i}: differs"


def _differ(a, b):
    return any(x.shape != y.shape or not torch.allclose(x.double(), y.double(), rtol=1e-3, atol=1e-3)
               for x, y in zip(a, b))


def _two_input_sets(name, case, device="cuda"):
    """Seeded (printed) inputs a and b of the case, with their eager results (which must differ)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    build = CASES[name][case]
    args_a, args_b = build(device), build(device)
    expected_a, expected_b = _eager(name, args_a), _eager(name, args_b)
    assert _differ(expected_a, expected_b), "the case's two input sets give the same result: a stale read would pass"
    return args_a, args_b, expected_a, expected_b


@pytest.mark.parametrize("name,case", [(n, c) for n in sorted(CASES) for c in CASES[n]])
def test_cases_are_valid_calls_with_distinct_results(name, case):
    """On the CPU too: each case is a valid call whose two input sets give different results, so a GPU session
    does not find a broken case first."""
    _two_input_sets(name, case, "cpu")


@pytest.mark.parametrize("name,case", _params())
def test_graph_capture_and_replay_match_eager(name, case):
    backends = _backends(name)
    if not backends:
        pytest.skip(f"no cuda or triton backend can run {name} here")
    for b in backends:
        with use_backend(b):
            args_a, args_b, expected_a, expected_b = _two_input_sets(name, case)
            static = _clone(args_a)
            _overload(name)(*_clone(static))  # warm-up outside the capture: compile, autotune, lazy handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = _overload(name)(*static)
            for args, expected in ((args_b, expected_b), (args_a, expected_a)):
                _copy_into(static, args)  # new inputs (and the in-place tensors' starting values)
                graph.replay()
                torch.cuda.synchronize()
                _assert_same(_outputs(name, result, static), expected, f"{name} [{case}] backend {b}, graph replay")


@pytest.mark.parametrize("name,case", _params())
def test_runs_on_the_current_stream_after_the_producer(name, case):
    backends = _backends(name)
    if not backends:
        pytest.skip(f"no cuda or triton backend can run {name} here")
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    for b in backends:
        with use_backend(b):
            args_a, args_b, expected_a, expected_b = _two_input_sets(name, case)
            buffers = _clone(args_a)  # valid inputs, but not the ones the producer is about to write
            torch.cuda.synchronize()
            with torch.cuda.stream(producer):
                torch.cuda._sleep(SLEEP_CYCLES)
                _copy_into(buffers, args_b)
            consumer.wait_stream(producer)
            with torch.cuda.stream(consumer):
                result = _overload(name)(*buffers)
                got = [o.clone() for o in _outputs(name, result, buffers)]  # read on the same stream, at once
            torch.cuda.synchronize()
            _assert_same(got, expected_b, f"{name} [{case}] backend {b}, on a side stream after a producer")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_int8_sr_update_checks_delta_where_it_costs_no_sync(device, weightkit_env):
    """int8_sr_update_'s NaN check of delta (it writes in place): on by default for CPU tensors, off by default on
    a GPU (a host sync per call, no CUDA-graph capture: a direct call runs under the "error" sync debug mode);
    weightkit.debug_checks() turns it on there, debug_checks(False) off on the CPU."""
    import weightkit
    from weightkit.ops.int8 import int8_sr_update_

    weightkit_env("WEIGHTKIT_DEBUG_CHECKS", None)
    weightkit_env("WEIGHTKIT_CHECK_FINITE", None)
    q, s = _int8_weight(4, 16, 8, device)
    bad = torch.full((4, 16), float("nan"), device=device)
    if device == "cpu":
        with pytest.raises(ValueError, match="delta contains 64 non-finite"):
            int8_sr_update_(q, s, bad, 8)
        with weightkit.debug_checks(False):
            int8_sr_update_(q, s, bad, 8)  # no check asked for: the NaN goes in (the caller's choice)
        return
    good = torch.randn(4, 16, device=device) * 0.05
    int8_sr_update_(q, s, good, 8)  # warm-up (compile / autotune may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        int8_sr_update_(q, s, good, 8, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with weightkit.debug_checks(), pytest.raises(ValueError, match="delta contains 64 non-finite"):
        int8_sr_update_(q, s, bad, 8)


@pytest.mark.parametrize("check", [test_graph_capture_and_replay_match_eager,
                                   test_runs_on_the_current_stream_after_the_producer],
                         ids=["graph-replay", "current-stream"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_memory_table_gradient_by_atomics_too(check):
    """The memory_lookup_backward cases above run the default table-gradient method (sorted segments); the atomics
    one (set_table_grad_mode) must hold the same under graph capture and on the current stream."""
    from weightkit.ops.memoryformer import set_table_grad_mode

    previous = set_table_grad_mode("atomics")
    try:
        check("memory_lookup_backward", "40tok")
    finally:
        set_table_grad_mode(previous)


# Tuned launches whose first call comes inside the capture (no warm-up at that shape): the autotuner must not time
# configs there (its synchronizations would invalidate the capture); the launch runs a provisional config, untimed
# and unrecorded, and the first eager call afterwards tunes (kernels/_shared.py, Launcher.provisional).
FIRST_IN_CAPTURE = [("int8_matmul", "1tok-1024x1024-tuned"), ("int8_matmul", "16tok-1024x1024-tuned"),
                    ("memory_lookup_forward", "4tok-tuned"), ("galore_adam_update_", "left")]


@pytest.mark.parametrize("name,case", [pytest.param(n, c, id=f"{n}-{c}", marks=cuda_only)
                                       for n, c in FIRST_IN_CAPTURE])
def test_first_call_inside_capture_tunes_later(name, case):
    from weightkit.kernels import _shared, galore

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    build = CASES[name][case]
    args_a, args_b = build("cuda"), build("cuda")
    with use_backend("triton"):
        _shared.clear_launch_caches()  # nothing chosen in this process: the captured call is the first
        galore._TUNED.clear()
        static = _clone(args_a)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = _overload(name)(*static)
        assert not any(launcher.chosen for launcher in _shared.LAUNCHERS) and not galore._TUNED, \
            "a first call inside the capture recorded a config"
        _copy_into(static, args_a)
        graph.replay()
        torch.cuda.synchronize()
        expected_a = _eager(name, args_a)  # the first eager call: tunes and records
        assert any(launcher.chosen for launcher in _shared.LAUNCHERS) or galore._TUNED
        _assert_same(_outputs(name, result, static), expected_a, f"{name} [{case}]: provisional config, replayed")
        _copy_into(static, args_b)
        graph.replay()  # the graph keeps its provisional launch after the tuning
        torch.cuda.synchronize()
        _assert_same(_outputs(name, result, static), _eager(name, args_b), f"{name} [{case}]: replayed after tuning")
