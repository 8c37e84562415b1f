"""tests/conftest.py seeds each test at random: a failing test must report its seed, and WEIGHTKIT_TEST_SEED must
replay it (same torch seed, so the same random inputs)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAILING_TEST = '''
import torch


def test_fails_with_its_inputs():
    print("drawn", torch.randn(3).tolist())
    assert False
'''


def run_pytest(folder, seed=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WEIGHTKIT_TEST_SEED", None)
    if seed is not None:
        env["WEIGHTKIT_TEST_SEED"] = str(seed)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout


def test_failing_test_reports_a_seed_that_replays_it(tmp_path):
    # the repository's conftest, as a conftest of a folder holding one failing test
    (tmp_path / "conftest.py").write_text("from tests.conftest import _fresh_seed, pytest_runtest_makereport  # noqa\n")
    (tmp_path / "test_one.py").write_text(FAILING_TEST)
    first = run_pytest(tmp_path)
    seed = re.search(r"WEIGHTKIT_TEST_SEED=(\d+) python -m pytest", first)
    assert seed is not None, first
    drawn = re.search(r"drawn \[.*\]", first).group(0)
    replay = run_pytest(tmp_path, seed=int(seed.group(1)))
    assert re.search(r"drawn \[.*\]", replay).group(0) == drawn
    assert f"torch seed {seed.group(1)}" in replay
