"""Shared test setup. Triton kernels run on CPU through the interpreter when there is no GPU; the variable must
be set before triton compiles anything, hence here, before weightkit is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# auto takes recorded choices or the static order, never measures (a measurement per new shape would add seconds
# of syncs to the CUDA suite and make which backend a test ran depend on timing); tests/test_auto_choice.py
# measures on purpose
os.environ.setdefault("WEIGHTKIT_AUTO", "table")

from weightkit import backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# the run of the cuda backend on simulated CUDA (tests/test_cudasim.py, tests/cudasim/plugin.py): triton is off there
CUDASIM = bool(os.environ.get("WEIGHTKIT_CUDASIM_LIB"))


TRITON_OFF = f"weightkit's Triton kernels are off here: {backend._TRITON_ERROR}"


def skip_module_without_triton_kernels():
    """Skips the calling test module, at its import, where weightkit's Triton kernels are off: triton missing or older
    than weightkit.backend.TRITON_MIN (torch < 2.11; the module would fail to import or to build its launchers).
    Modules that import where the kernels are off, and single tests, carry the ``triton_kernels`` marker instead."""
    if not backend._TRITON_OK:
        pytest.skip(TRITON_OFF, allow_module_level=True)


def usable_backends(table, device):
    """The backends of ``table`` (a weightkit.backend.KernelTable) that can run on ``device``, reference first."""
    device = torch.device(device)
    return [b for b in backend.BACKENDS if table.why_not(b, device) is None]


# Unit roundoff of each float dtype (half an ulp of 1): the precision contracts of the quantized matmuls use it.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_quantized_matmul_contract(y, x, w64, transpose, label=""):
    """int8_matmul / int4_matmul's precision contract (their docstrings: the weight may be rounded once to x's dtype,
    fp32 products and sums, the output rounded once) against float64: |y - ref| <= u |ref| + (u + K 2^-23) S with
    S = |x| @ |W^T| and u x's unit roundoff, times 2 for the second-order terms. A worst-case bound: a wrong value
    (scale, group, index, a missing block) exceeds it, and so does, for fp32 x, a weight rounded to a 16-bit dtype."""
    wt = w64 if transpose else w64.T
    ref = x.double() @ wt
    terms = x.double().abs() @ wt.abs()
    u = UNIT_ROUNDOFF[x.dtype]
    bound = 2 * (u * ref.abs() + (u + wt.shape[0] * 2.0 ** -23) * terms)
    assert y.dtype == x.dtype and y.shape == ref.shape, f"{label}: {y.dtype} {tuple(y.shape)}"
    err = (y.double() - ref).abs()
    excess = err - bound
    assert bool(torch.isfinite(y).all()) and float(excess.max()) <= 0, (
        f"{label}: max |err| {float(err.max()):.3g}, worst excess over the contract {float(excess.max()):.3g}")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow (minutes on 2 cores): run with WEIGHTKIT_RUN_SLOW=1")
    run_slow = os.environ.get("WEIGHTKIT_RUN_SLOW") == "1"
    skip_triton = pytest.mark.skip(reason=TRITON_OFF)
    for item in items:
        if "triton_kernels" in item.keywords and not backend._TRITON_OK:
            item.add_marker(skip_triton)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


SEED_ENV = "WEIGHTKIT_TEST_SEED"  # replay: the seed a failing test reported


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test starts from a fresh random torch seed (tests must hold for any input), or from WEIGHTKIT_TEST_SEED
    when set. A failing test's report names its seed and the command that replays it (pytest_runtest_makereport)."""
    fixed = os.environ.get(SEED_ENV)
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    request.node.weightkit_seed = seed
    torch.manual_seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "weightkit_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("weightkit seed", f"torch seed {seed}; replay with: {SEED_ENV}={seed} python -m pytest "
                                                  f"'{item.nodeid}'"))


def pytest_report_header(config):
    if os.environ.get(SEED_ENV):
        return f"weightkit: every test seeded with {SEED_ENV}={os.environ[SEED_ENV]}"
    return None


@pytest.fixture
def weightkit_env(monkeypatch):
    """``weightkit_env(name, value)`` sets an environment variable that weightkit reads at import (backend,
    interpreter, debug checks) and re-reads it; the original environment is restored afterwards."""

    def set_env(name, value):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        backend.reload_env()

    yield set_env
    monkeypatch.undo()
    backend.reload_env()
