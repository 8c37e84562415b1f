"""weightkit.benchreport: baselines, speed-ups and roofline shares from a pytest-benchmark JSON, and the picture."""

import pytest

from weightkit import benchreport


def _bench(op, backend, shape, mean, **extra):
    return {"name": f"test_{op}[{backend}]", "stats": {"mean": mean},
            "extra_info": dict(op=op, backend=backend, shape=shape, **extra)}


DATA = {
    "machine_info": {"weightkit": {"device": "test device", "copy_GBps": 100.0}},
    "datetime": "2026-11-26T10:00:00",
    "benchmarks": [
        _bench("linear", "nn.Linear", [1, 64], 2e-3),
        _bench("linear", "reference", [1, 64], 8e-3),
        _bench("linear", "triton", [1, 64], 1e-3, **{"GB/s": 50.0}),
        _bench("linear", "nn.Linear", [16, 64], 4e-3),
        _bench("linear", "triton", [16, 64], 8e-3, **{"GB/s": 25.0}),
        _bench("sr", "reference", [1024], 4e-3),
        _bench("sr", "cpu", [1024], 1e-3),
        _bench("sr", "cpu", [4096], 2e-3),  # no reference at this size: left out of the speed-ups
    ],
}


def test_baseline_is_the_peer_else_the_reference():
    assert benchreport.baselines(DATA) == {"linear": "nn.Linear", "sr": "reference"}
    one = dict(DATA, benchmarks=[_bench("sr", "cpu", [1024], 1e-3)])  # a run of one backend: its own baseline
    assert benchreport.baselines(one) == {"sr": "cpu"} and benchreport.speedups(one)["sr"]["lines"]["cpu"][0][1] == 1


def test_speedups_and_copy_share():
    sp = benchreport.speedups(DATA)
    lin = sp["linear"]
    assert lin["baseline"] == "nn.Linear" and len(lin["shapes"]) == 2
    assert lin["lines"]["triton"] == [(0, pytest.approx(2.0), pytest.approx(50.0)), (1, pytest.approx(0.5),
                                                                                     pytest.approx(25.0))]
    assert lin["lines"]["reference"] == [(0, pytest.approx(0.25), None)]
    assert lin["lines"]["nn.Linear"][0][1] == pytest.approx(1.0)
    assert sp["sr"]["lines"]["cpu"] == [(0, pytest.approx(4.0), None)]


def test_table_shows_copy_share_and_ratios():
    text = benchreport.table(DATA)
    assert "copy bandwidth 100.0 GB/s" in text
    row = next(line for line in text.splitlines() if line.startswith("| linear | triton | [1, 64]"))
    assert "| 50% |" in row and "8.00x" in row and "nn.Linear 2.00x" in row


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = benchreport.plot(DATA, str(tmp_path / "speedups.png"))
    assert out and (tmp_path / "speedups.png").stat().st_size > 1000


def test_docs_benchmarks_page_is_generated_from_the_results():
    """docs/benchmarks.md is what `make docs` makes of bench/results/: every figure there comes from a result file
    (with its device, versions and date), and a new result file without a regenerated page fails here."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    page = benchreport.docs_page(os.path.join(root, "bench", "results"))
    with open(os.path.join(root, "docs", "benchmarks.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == page, "docs/benchmarks.md is stale: run `make docs` and commit it"
    assert "device: NVIDIA H200; torch 2.11.0+cu130" in page  # the headers carry device and versions


def test_bench_suites_run_as_tests_with_benchmarks_disabled():
    """``pytest bench --benchmark-disable`` (pytest-benchmark's way to run the suites as tests, each body once and
    untimed) works: pytest-benchmark then keeps no statistics, and the suites' throughput and per-call figures must
    not read them (they raised AttributeError on ``benchmark.stats`` before). Two suites of the two kinds: one
    through bench/conftest's ``measure`` fixture, one that times its own rounds."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/test_bench_host.py", "bench/test_bench_quant.py", "-k",
                           "binding or (Int8Linear and inference) or (stochastic_round and cpu)"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.lower(), proc.stdout[-2000:]
