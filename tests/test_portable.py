"""One build of weightkit._C serves several torch releases: the module this checkout built (under the test command's
torch) runs every CPU kernel under a second torch release and gives the same bits.

The second release is the Python interpreter named by WEIGHTKIT_PORTABLE_PYTHON, else ``.venv-portable/bin/python``
in the repository (what ``make check-portable`` / scripts/check_portable.sh creates, with torch 2.14.1). Nothing
outside the repository is looked up. Without one the test skips and says how to get one; with
WEIGHTKIT_PORTABLE_PYTHON set to a path that is not an interpreter it fails (a misconfigured check must not pass as a
skip). The second interpreter must be the same Python version: _C is a CPython extension.
"""

import json
import os
import subprocess

import pytest
import torch

from tests import portable_cases
from weightkit import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PORTABLE_PYTHON = os.path.join(ROOT, ".venv-portable", "bin", "python")


def other_python(environ=os.environ):
    """(interpreter, None) or (None, why the comparison cannot run); raises for a misconfigured
    WEIGHTKIT_PORTABLE_PYTHON."""
    configured = environ.get("WEIGHTKIT_PORTABLE_PYTHON")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise FileNotFoundError(f"WEIGHTKIT_PORTABLE_PYTHON={configured!r} is not an executable interpreter")
        return configured, None
    if os.path.exists(DEFAULT_PORTABLE_PYTHON):
        return DEFAULT_PORTABLE_PYTHON, None
    return None, (f"no second torch environment: {os.path.relpath(DEFAULT_PORTABLE_PYTHON, ROOT)} does not exist and "
                  "WEIGHTKIT_PORTABLE_PYTHON is unset (`make check-portable` creates one with torch 2.14.1 and runs "
                  "this test)")


def test_the_second_interpreter_is_configurable(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert other_python({"WEIGHTKIT_PORTABLE_PYTHON": str(fake)}) == (str(fake), None)
    with pytest.raises(FileNotFoundError, match="WEIGHTKIT_PORTABLE_PYTHON='/no/such/python' is not an executable"):
        other_python({"WEIGHTKIT_PORTABLE_PYTHON": "/no/such/python"})
    python, reason = other_python({})
    if os.path.exists(DEFAULT_PORTABLE_PYTHON):
        assert python == DEFAULT_PORTABLE_PYTHON and reason is None
    else:
        assert python is None and "make check-portable" in reason and "WEIGHTKIT_PORTABLE_PYTHON" in reason


def test_cases_cover_every_cpu_kernel():
    """Each C function of the CPU kernels is reached by some case (a kernel added later must be added here too)."""
    from weightkit import _C

    calls = []
    wrapped = {}
    for name in _C.CPU_FUNCTIONS:
        short = name[len("wk_cpu_"):]
        fn = getattr(native.CPU, short)
        wrapped[short] = fn

        def spy(*args, _fn=fn, _name=short):
            calls.append(_name)
            return _fn(*args)

        setattr(native.CPU, short, spy)
    try:
        portable_cases.run(portable_cases.make_inputs())
    finally:
        for short, fn in wrapped.items():
            setattr(native.CPU, short, fn)
    missing = {n for n in wrapped if n != "abi_version"} - set(calls)
    assert not missing, f"no portable case calls {sorted(missing)}"


def test_same_library_same_bits_under_another_torch(tmp_path):
    python, reason = other_python()
    if python is None:
        pytest.skip(reason)
    assert native.CPU is not None, native.CPU_ERROR
    inputs = portable_cases.make_inputs()
    path = tmp_path / "cases.pt"
    torch.save({"torch": str(torch.__version__), "inputs": inputs, "outputs": portable_cases.run(inputs)}, path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WEIGHTKIT_DISABLE_EXTENSION", None)
    proc = subprocess.run([python, "-m", "tests.portable_cases", str(path)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout + proc.stderr
    report = json.loads(lines[-1])
    if report["torch"] == torch.__version__:
        pytest.skip(f"{python} has the same torch ({report['torch']}): nothing to compare")
    assert report["library"] == native.CPU_PATH, report  # the very same file, not a rebuild
    assert report["cases"] == len(inputs)
    assert report["differ_from_saved"] == {}, report
    assert report["differ_from_reference"] == {}, report
    assert proc.returncode == 0, proc.stdout + proc.stderr
