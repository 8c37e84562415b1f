"""weightkit bench: runs a suite, writes JSON + PNG, prints the table; bad suite names are refused."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_command(tmp_path):
    import torch

    compiled = "cuda" if torch.cuda.is_available() else "cpu"  # the bench runs on the machine's device
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker's settings
    proc = subprocess.run([sys.executable, "-m", "weightkit", "bench", "--suite", "quant", "-k",
                           f"test_stochastic_round_int8 and 1024 and {compiled}", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = os.listdir(tmp_path)
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1 and any(f.endswith(".png") for f in files)
    data = json.load(open(tmp_path / js[0]))
    (bench,) = data["benchmarks"]
    assert bench["extra_info"]["backend"] == compiled and bench["extra_info"]["GB/s"] > 0
    assert data["machine_info"]["weightkit"]["torch"].startswith("2.")
    assert f"| stochastic_round_int8 | {compiled} | [1024, 1024] |" in proc.stdout


def test_bench_rejects_unknown_suite():
    proc = subprocess.run([sys.executable, "-m", "weightkit", "bench", "--suite", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown suite 'nope'" in proc.stderr
