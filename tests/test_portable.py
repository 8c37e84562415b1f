"""One build of the kernel libraries serves several torch releases: the library this checkout built (under the test
command's torch) runs every CPU kernel under a second torch release and gives the same bits.

The second release is the Python interpreter named by WEIGHTKIT_PORTABLE_PYTHON, else ``.venv-portable/bin/python``
in the repository, else /work/venvs/portable-ext-214/bin/python (the 2.14.1 venv of the session that wrote this);
``bash scripts/check_portable.sh`` creates one (torch 2.14.1) and runs this test. Without one the test skips.
"""

import json
import os
import subprocess

import pytest
import torch

from tests import portable_cases
from weightkit import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (os.environ.get("WEIGHTKIT_PORTABLE_PYTHON"), os.path.join(ROOT, ".venv-portable", "bin", "python"),
              "/work/venvs/portable-ext-214/bin/python")


def _other_python():
    for path in CANDIDATES:
        if path and os.path.exists(path):
            return path
    return None


def test_cases_cover_every_cpu_kernel():
    """Each C function of the CPU library is reached by some case (a kernel added later must be added here too)."""
    calls = []
    wrapped = {}
    for name in native._CPU_SIGNATURES:
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
    python = _other_python()
    if python is None:
        pytest.skip("no second torch interpreter (set WEIGHTKIT_PORTABLE_PYTHON or run scripts/check_portable.sh)")
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
    assert report["library"] == native.CPU.path, report  # the very same file, not a rebuild
    assert report["cases"] == len(inputs)
    assert report["differ_from_saved"] == {}, report
    assert report["differ_from_reference"] == {}, report
    assert proc.returncode == 0, proc.stdout + proc.stderr
