"""Backend selection: automatic choice, forcing, fallback with one warning, running without the extension."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from weightkit import backend, use_backend
from weightkit.ops import int8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_prefers_compiled_cpu_kernel():
    if not backend.extension_loaded():
        pytest.fail(f"the compiled extension must build and load in the test environment: {backend.status()['cpu']}")
    assert int8._SR.select(torch.device("cpu")) == "cpu"


def test_use_backend_forces_and_restores():
    assert backend.requested_backend() == "auto"
    with use_backend("reference"):
        assert backend.requested_backend() == "reference"
        assert int8._SR.select(torch.device("cpu")) == "reference"
        with use_backend("triton"):
            assert backend.requested_backend() == "triton"
        assert backend.requested_backend() == "reference"
    assert backend.requested_backend() == "auto"


def test_unknown_backend_is_rejected(weightkit_env):
    with pytest.raises(ValueError, match="backend='tpu' is not a weightkit backend"):
        with use_backend("tpu"):
            pass
    weightkit_env("WEIGHTKIT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="WEIGHTKIT_BACKEND='gpu'"):
        backend.requested_backend()


def test_env_var_forces_backend(weightkit_env):
    weightkit_env("WEIGHTKIT_BACKEND", "reference")
    assert int8._SR.select(torch.device("cpu")) == "reference"


def test_unusable_backend_falls_back_with_one_warning():
    backend._WARNED.clear()
    x = torch.randn(4, 8)
    scale = int8.absmax_scale(x, 8)
    with use_backend("cuda"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = int8.stochastic_round_int8(x, scale, 8, seed=1)
            b = int8.stochastic_round_int8(x, scale, 8, seed=1)
    msgs = [str(w.message) for w in caught if "cannot run" in str(w.message)]
    assert len(msgs) == 1 and "backend 'cuda' cannot run stochastic_round_int8 on cpu" in msgs[0]
    with use_backend("reference"):
        assert torch.equal(a, int8.stochastic_round_int8(x, scale, 8, seed=1)) and torch.equal(a, b)


def _run(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


def test_package_works_without_extension():
    code = (
        "import torch, weightkit\n"
        "from weightkit.ops import int8\n"
        "assert not weightkit.backend.extension_loaded()\n"
        "x = torch.randn(4, 8); s = int8.absmax_scale(x, 8)\n"
        "print(int8._SR.select(torch.device('cpu')), int8.stochastic_round_int8(x, s, 8, seed=1).shape)\n"
    )
    proc = _run(code, WEIGHTKIT_DISABLE_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference torch.Size([4, 8])"


def test_info_command():
    proc = subprocess.run([sys.executable, "-m", "weightkit", "info"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "reference", "cpu", "cuda"):
        assert word in proc.stdout
    assert "cpu        ok" in proc.stdout


def test_demo_command():
    proc = subprocess.run([sys.executable, "-m", "weightkit", "demo", "--rows", "64", "--cols", "64", "--group-size", "32"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical to reference: True" in proc.stdout
