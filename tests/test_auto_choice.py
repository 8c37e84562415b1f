"""``auto``'s measured choice per regime (weightkit/backend.py, "Measured choice"), on the CPU: a KernelTable whose
backends all 'run' on a CUDA device, a timer of the test's own, a device name of the test's own. The GPU side (CUDA
events) runs in bench/gpu_report.py's ``auto`` section and in tests/test_cuda_graphs.py on a GPU."""

import contextlib
import json
import os
import warnings

import pytest
import torch

from weightkit import backend
from weightkit.backend import KernelTable, MeasuredChoice

CUDA0 = torch.device("cuda", 0)


class _AnyDevice(KernelTable):
    """Every registered backend can run anywhere (no GPU here)."""

    def why_not(self, name, device):
        return None if name in self.impls else f"no {name}"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A named fake GPU, a timer reading each candidate's 'speed' from the table, and a clean auto state."""
    monkeypatch.setattr(backend, "_device_name", lambda device: "Fake GPU 9000")
    timed = []

    def timer(fn, args, kwargs):
        timed.append(fn.__name__)
        fn(*args, **kwargs)
        return fn.ms(args[0]) if callable(fn.ms) else fn.ms

    monkeypatch.setattr(MeasuredChoice, "timer", staticmethod(timer))
    monkeypatch.delenv("WEIGHTKIT_AUTO", raising=False)
    monkeypatch.delenv("WEIGHTKIT_AUTO_TABLE", raising=False)
    backend.reload_env()
    yield timed
    monkeypatch.undo()  # the suite's environment first (WEIGHTKIT_AUTO=table), then re-read it
    backend.reload_env()


def _impl(name, ms, calls, mutate=False):
    def fn(x, *rest):
        calls.append(name)
        if mutate:
            x.add_(1)
        return x * 2 if not mutate else None

    fn.__name__ = name
    fn.ms = ms
    return fn


def _table(name, ms, mutates=(), regime=lambda x, *rest: (x.shape[0], x.dtype)):
    calls = []
    t = _AnyDevice(name, cuda_order=("cuda", "triton"), regime=regime, mutates=mutates)
    for b, m in ms.items():
        t.register(b)(_impl(b, m, calls, mutate=bool(mutates)))
    t.register("reference")(_impl("reference", 99.0, calls, mutate=bool(mutates)))
    return t, calls


def test_auto_measures_once_per_regime_and_runs_the_fastest(fake_gpu):
    t, calls = _table("fake_mm", {"cuda": 2.0, "triton": 1.0})
    x = torch.randn(4, 3)
    torch.testing.assert_close(t(CUDA0, x), x * 2)
    assert fake_gpu == ["cuda", "triton"]  # measured both
    assert calls[-1] == "triton"  # then ran the faster for the call itself
    calls.clear()
    for _ in range(3):
        t(CUDA0, torch.randn(4, 3))
    assert calls == ["triton"] * 3 and len(fake_gpu) == 2  # remembered: no second measurement
    assert t.backend_for(x, device=CUDA0) == "triton" and t.select(CUDA0) == MeasuredChoice.LABEL
    (entry,) = [e for e in backend.auto_choices() if e["op"] == "fake_mm"]
    assert entry == dict(device="Fake GPU 9000", op="fake_mm", regime="4|float32", backend="triton", how="measured",
                         ms={"cuda": 2.0, "triton": 1.0})


def test_each_regime_has_its_own_winner(fake_gpu):
    # cuda faster for many rows, triton for few: the regime is the row count
    t, calls = _table("fake_mm2", {"cuda": lambda x: 5.0 / x.shape[0], "triton": lambda x: 1.0})
    t(CUDA0, torch.randn(1, 3))
    t(CUDA0, torch.randn(64, 3))
    assert t.backend_for(torch.randn(1, 3), device=CUDA0) == "triton" and t.backend_for(torch.randn(64, 3), device=CUDA0) == "cuda"
    calls.clear()
    t(CUDA0, torch.randn(64, 3)), t(CUDA0, torch.randn(1, 3))
    assert calls == ["cuda", "triton"]


def test_measurement_works_on_copies_of_what_the_op_writes(fake_gpu):
    t, calls = _table("fake_update_", {"cuda": 2.0, "triton": 1.0}, mutates=(0,))
    w = torch.zeros(5)
    t(CUDA0, w)
    assert calls == ["cuda", "triton", "triton"]  # two measurements, then the call
    assert torch.equal(w, torch.ones(5))  # written once, by the call itself


def test_a_failing_candidate_is_left_out_with_a_warning(fake_gpu):
    t, calls = _table("fake_fail", {"cuda": 1.0, "triton": 2.0})

    def broken(x, *rest):
        raise RuntimeError("no kernel for this shape")

    broken.ms = 0.5
    t.register("cuda")(broken)
    with pytest.warns(RuntimeWarning, match="fake_fail: backend 'cuda' failed while auto measured it"):
        y = t(CUDA0, torch.ones(2))
    assert torch.equal(y, torch.full((2,), 2.0)) and t.backend_for(torch.ones(2), device=CUDA0) == "triton"


def test_no_measurement_under_deterministic_algorithms(fake_gpu):
    t, calls = _table("fake_det", {"cuda": 2.0, "triton": 1.0})
    x = torch.randn(2, 2)
    torch.use_deterministic_algorithms(True)
    try:
        t(CUDA0, x)
        assert calls == ["cuda"] and fake_gpu == []  # the static order
    finally:
        torch.use_deterministic_algorithms(False)
    t(CUDA0, x)
    assert fake_gpu == [] and calls[-1] == "cuda"  # remembered for the process: no per-call lookups of the table
    assert backend.auto_choices()[-1]["how"] == "static"


def test_no_measurement_in_a_distributed_job(fake_gpu, monkeypatch):
    """Ranks must not choose by their own timing noise (replicated weights would drift apart)."""
    t, calls = _table("fake_ddp", {"cuda": 2.0, "triton": 1.0})
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    t(CUDA0, torch.randn(2, 2))
    assert calls == ["cuda"] and fake_gpu == []
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)  # a job of one rank measures
    t(CUDA0, torch.randn(3, 2))
    assert fake_gpu == ["cuda", "triton"]


def test_static_and_table_modes(fake_gpu, monkeypatch):
    monkeypatch.setenv("WEIGHTKIT_AUTO", "static")
    backend.reload_env()
    t, calls = _table("fake_static", {"cuda": 2.0, "triton": 1.0})
    t(CUDA0, torch.randn(2, 2))
    assert calls == ["cuda"] and fake_gpu == [] and t.select(CUDA0) == "cuda"
    monkeypatch.setenv("WEIGHTKIT_AUTO", "table")
    backend.reload_env()
    calls.clear()
    t(CUDA0, torch.randn(2, 2))
    assert calls == ["cuda"] and fake_gpu == [] and t.select(CUDA0) == MeasuredChoice.LABEL


def test_a_forced_backend_is_not_measured(fake_gpu):
    t, calls = _table("fake_forced", {"cuda": 2.0, "triton": 1.0})
    with backend.use_backend("cuda"):
        t(CUDA0, torch.randn(2, 2))
    assert calls == ["cuda"] and fake_gpu == []


def test_cpu_tensors_never_measure(fake_gpu):
    t, calls = _table("fake_cpu", {"cuda": 2.0, "triton": 1.0})
    t.register("cpu")(_impl("cpu", 1.0, calls))
    t(torch.device("cpu"), torch.randn(2, 2))
    assert calls == ["cpu"] and fake_gpu == []


def test_saved_choices_are_used_by_the_next_process(fake_gpu, tmp_path, monkeypatch):
    t, calls = _table("fake_saved", {"cuda": 2.0, "triton": 1.0})
    t(CUDA0, torch.randn(8, 2))
    path = str(tmp_path / "choices.json")
    assert backend.save_auto_choices(path, note="test run") == 1
    data = json.load(open(path))
    assert data["devices"]["Fake GPU 9000"]["fake_saved"] == {"8|float32": "triton"}
    assert data["notes"]["Fake GPU 9000"] == "test run"
    # "the next process": measured choices forgotten, the file named by WEIGHTKIT_AUTO_TABLE
    monkeypatch.setenv("WEIGHTKIT_AUTO_TABLE", path)
    backend.reload_env()
    t2, calls2 = _table("fake_saved", {"cuda": 0.1, "triton": 1.0})  # cuda would now measure faster
    t2(CUDA0, torch.randn(8, 2))
    assert calls2 == ["triton"] and len(fake_gpu) == 2  # recorded: no new measurement
    assert backend.auto_choices()[-1]["how"] == "recorded"
    t2(CUDA0, torch.randn(16, 2))  # a regime the file does not hold is measured
    assert calls2[-1] == "cuda" and len(fake_gpu) == 4


def test_a_bad_recorded_file_warns_and_is_ignored(fake_gpu, tmp_path, monkeypatch):
    path = tmp_path / "bad.json"
    path.write_text('{"format": 7}')
    monkeypatch.setenv("WEIGHTKIT_AUTO_TABLE", str(path))
    backend.reload_env()
    t, calls = _table("fake_badfile", {"cuda": 2.0, "triton": 1.0})
    with pytest.warns(RuntimeWarning, match="not a weightkit auto-choices file"):
        t(CUDA0, torch.randn(2, 2))
    assert calls[-1] == "triton"


def test_the_shipped_choices_name_real_ops_regimes_and_backends():
    """weightkit/auto_choices.json (written by bench/gpu_report.py's auto section from a GPU run): every op is a
    KernelTable with a regime and every backend is one of its cuda_order."""
    if not os.path.exists(backend.RECORDED_FILE):
        pytest.skip("no recorded choices shipped yet (no GPU run of the auto section)")
    import weightkit.ops  # noqa: F401 - registers every table
    tables = {t.name: t for t in backend._TABLES}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        devices = backend._read_recorded(backend.RECORDED_FILE)
    for dev, ops in devices.items():
        for op, regimes in ops.items():
            assert op in tables and tables[op].regime is not None, (dev, op)
            for key, name in regimes.items():
                assert name in tables[op].cuda_order, (dev, op, key, name)


def test_a_gpu_reports_choices_can_be_shipped(tmp_path):
    """bench/gpu_report.py --ship-auto-choices: the auto section's rows of a report become recorded choices."""
    from bench import gpu_report

    report = tmp_path / "r.json"
    choice = dict(device="NVIDIA H200", op="int8_matmul", regime="16|8192x8192|128|False|bfloat16", backend="triton",
                  how="measured", ms={"cuda": 0.05, "triton": 0.03})
    static = dict(choice, regime="1|8x8|8|False|float32", how="static", ms=None)
    report.write_text(json.dumps(dict(meta=dict(device="NVIDIA H200", date="2026-12-05", torch="2.11", triton="3.6"),
                                      rows=[dict(section="quant", name="x", ms=1.0),
                                            dict(section="auto", name="a", ms=0.03, choice=choice),
                                            dict(section="auto", name="b", choice=static)])))
    out = tmp_path / "auto_choices.json"
    assert gpu_report.ship_auto_choices(str(report), str(out)) == 1  # measured choices only
    devices = backend._read_recorded(str(out))
    assert devices == {"NVIDIA H200": {"int8_matmul": {"16|8192x8192|128|False|bfloat16": "triton"}}}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def measuring(monkeypatch):
    """auto in its default mode (the suite runs with WEIGHTKIT_AUTO=table), nothing measured or recorded yet."""
    monkeypatch.setenv("WEIGHTKIT_AUTO", "measure")
    monkeypatch.delenv("WEIGHTKIT_AUTO_TABLE", raising=False)
    backend.reload_env()
    backend._RECORDED["loaded"] = {}  # whatever is shipped: these tests measure
    yield
    monkeypatch.undo()
    backend.reload_env()


@needs_cuda
def test_auto_measures_real_backends_on_cuda(measuring):
    """On a GPU: the GaLore write-back (cuda and triton both run) is measured once per regime with CUDA events, the
    result is what the forced backends give, and a later CUDA-graph capture replays the chosen backend."""
    from weightkit.ops import galore as gops

    try:
        dev = torch.device("cuda")
        usable = gops._GALORE._usable(dev)
        if len(usable) < 2:
            pytest.skip(f"one GPU backend only: {usable}")
        g = torch.Generator(device=dev).manual_seed(0)
        w0 = torch.randn(96, 160, device=dev, generator=g)
        ortho = torch.linalg.qr(torch.randn(96, 16, device=dev, generator=g))[0]
        low = torch.randn(16, 160, device=dev, generator=g)

        def run(forced=None):
            w, m, v = w0.clone(), torch.zeros_like(low), torch.zeros_like(low)
            ctx = backend.use_backend(forced) if forced else contextlib.nullcontext()
            with ctx:
                gops.galore_adam_update_(w, low, m, v, ortho, True, step_size=1e-2)
            return w

        got = run()
        (entry,) = [e for e in backend.auto_choices() if e["op"] == "galore_adam_update_"]
        assert entry["how"] == "measured" and set(entry["ms"]) == set(usable)
        assert all(ms > 0 for ms in entry["ms"].values())
        torch.testing.assert_close(got, run(entry["backend"]), rtol=0, atol=0)
        # captured after the measurement: the graph runs the chosen backend
        w, m, v = w0.clone(), torch.zeros_like(low), torch.zeros_like(low)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gops.galore_adam_update_(w, low, m, v, ortho, True, step_size=1e-2)
        w.copy_(w0), m.zero_(), v.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(w, got, rtol=0, atol=0)
        assert len([e for e in backend.auto_choices() if e["op"] == "galore_adam_update_"]) == 1
    finally:
        backend.reload_env()


@needs_cuda
def test_auto_does_not_measure_inside_cuda_graph_capture(measuring):
    from weightkit.ops import galore as gops

    try:
        dev = torch.device("cuda")
        if len(gops._GALORE._usable(dev)) < 2:
            pytest.skip("one GPU backend only")
        w = torch.randn(64, 96, device=dev)
        ortho = torch.linalg.qr(torch.randn(64, 8, device=dev))[0]
        low, m, v = torch.randn(8, 96, device=dev), torch.zeros(8, 96, device=dev), torch.zeros(8, 96, device=dev)
        # warm the kernels on a side stream (compiles), but through forced backends: auto has measured nothing
        for b in gops._GALORE._usable(dev):
            with backend.use_backend(b):
                gops.galore_adam_update_(w.clone(), low, m.clone(), v.clone(), ortho, True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a measurement here would sync and fail the capture
            gops.galore_adam_update_(w, low, m, v, ortho, True)
        graph.replay()
        torch.cuda.synchronize()
        assert not [e for e in backend.auto_choices() if e["op"] == "galore_adam_update_"]
    finally:
        backend.reload_env()


def test_every_op_with_two_gpu_backends_chooses_by_measurement():
    """ARCHITECTURE.md: auto picks the measured-fastest backend per regime. Every table whose cuda_order names two
    backends has a regime; the regime of a call is hashable and cheap (plain values) for each op's arguments."""
    import weightkit.ops  # noqa: F401 - registers every table

    tables = {t.name: t for t in backend._TABLES}
    two = [t for t in tables.values() if len(t.cuda_order) > 1]
    assert len(two) >= 10, sorted(tables)
    missing = [t.name for t in two if t.regime is None]
    assert not missing, missing


@pytest.mark.triton_kernels
def test_each_regime_takes_its_ops_real_arguments(monkeypatch, tmp_path):
    """The regimes only run on a GPU under auto: here every table's regime is evaluated on the arguments of real
    calls (bench/gpu_report.py's auto section at toy sizes on the CPU, which calls every op with a regime), so an
    arity or attribute slip fails on the CPU, not on the first GPU run."""
    from bench import gpu_report

    import weightkit.ops  # noqa: F401

    seen = {}
    original = KernelTable._lookup

    def lookup(self, device):
        name, impl = original(self, device)
        if self.regime is None:
            return name, impl

        def checked(*args, **kwargs):
            regime = self.regime(*args, **kwargs)
            hash(regime)
            seen.setdefault(self.name, backend.regime_key(regime))
            return impl(*args, **kwargs)

        self._chosen[(backend._FORCED.get(), device)] = (name, checked)
        return name, checked

    tables = [t for t in backend._TABLES if t.regime is not None]
    for t in tables:
        t._chosen.clear()
    monkeypatch.setattr(KernelTable, "_lookup", lookup)
    for name, value in (("QUANT_D", 256), ("QUANT_TOKENS", (1, 5)), ("MEM_D", 64), ("MEM_TOKENS", (1, 6)),
                        ("DICT", (128, 40, 20)), ("DICT_TOKENS", (1, 6)), ("GALORE_SHAPES", (((24, 16), 4),)),
                        ("QGALORE_SHAPE", (128, 4))):
        monkeypatch.setattr(gpu_report, name, value)
    try:
        assert gpu_report.main(["--device", "cpu", "--out", str(tmp_path / "r.json"), "--only", "auto",
                                "--budget", "600"]) == 0
    finally:
        for t in tables:
            t._chosen.clear()
    data = json.load(open(tmp_path / "r.json"))
    assert not [r for r in data["rows"] if "error" in r]
    assert set(seen) == {t.name for t in tables}, sorted({t.name for t in tables} - set(seen))
