"""The GPU check's logic, on the CPU: scripts/gpu_check.sh picks and skips stages, holds each stage to its limit and
writes summary.txt (run here without a GPU, and with a fake python that claims one); bench/gpu_report.py writes its
JSON row by row, skips rows past a budget, cuts a row that overruns it, and skips rows whose optional peer
(bitsandbytes) is missing without losing the rest of the section. No timing is judged."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

needs_tools = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


# -- bench/gpu_report.py ------------------------------------------------------------------------------------------

@pytest.fixture
def report(monkeypatch):
    from bench import gpu_report

    monkeypatch.setattr(gpu_report, "SECTIONS", dict(gpu_report.SECTIONS))
    monkeypatch.setattr(gpu_report, "DEV", gpu_report.DEV)
    return gpu_report


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.triton_kernels
def test_report_writes_each_row_as_it_goes(report, tmp_path):
    out = tmp_path / "r.json"
    seen = []

    def section():
        report.row("fake", "first", lambda: None)
        # the JSON on disk already holds the first row while the second one runs
        report.row("fake", "second", lambda: seen.append([r["name"] for r in _read(out)["rows"]]))

    report.SECTIONS["fake"] = section
    assert report.main(["--device", "cpu", "--only", "fake", "--out", str(out), "--budget", "60"]) == 0
    assert seen and seen[0] == ["first"]
    data = _read(out)
    assert data["complete"] is True
    assert [r["name"] for r in data["rows"]] == ["first", "second"]
    assert all("ms" in r and "host_ms" in r for r in data["rows"])
    assert data["sections"]["fake"]["status"] == "done" and data["sections"]["fake"]["rows"] == 2
    assert not (tmp_path / "r.json.tmp").exists()


@pytest.mark.triton_kernels
def test_report_counts_each_sections_triton_compiles(report, tmp_path):
    """Each section's status says what Triton compiled while it ran (its compilation listener: compiles, their
    seconds, disk-cache hits), so a GPU run shows how much of a budget went to compiling; the listener in place
    before the report is put back. (Nothing compiles on the CPU: the section calls the listener as Triton would.)"""
    from types import SimpleNamespace

    import triton

    knobs = triton.knobs.compilation
    mine = object()
    old, knobs.listener = knobs.listener, mine
    seen = []

    def section():
        listener = knobs.listener
        seen.append(listener is not mine)
        for total_us, hit in ((1_500_000, False), (700_000, False), (5_000, True)):
            listener(src=None, metadata={}, metadata_group={}, times=SimpleNamespace(total=total_us), cache_hit=hit)
        report.row("fake", "one", lambda: None)

    report.SECTIONS["fake"] = section
    try:
        out = tmp_path / "r.json"
        assert report.main(["--device", "cpu", "--only", "fake", "--out", str(out), "--budget", "60"]) == 0
        assert knobs.listener is mine
    finally:
        knobs.listener = old
    status = _read(out)["sections"]["fake"]
    assert seen == [True]
    assert (status["compiles"], status["compile_s"], status["compile_cache_hits"]) == (2, 2.2, 1), status


@pytest.mark.triton_kernels
def test_report_budget_skips_rows_and_cuts_a_row_that_overruns(report, tmp_path):
    out = tmp_path / "r.json"
    built = []

    def slow():
        report.row("slow", "measured", lambda: None)
        report.row("slow", "overruns", lambda: time.sleep(0.3))  # warm-up + timing: past the 0.5 s budget
        report.row("slow", "never reached", lambda: None)

    def late():
        report.row("late", "runs", lambda: None)
        report._SECTION_DEADLINE[0] = time.time() - 1  # as if the rows above had used the budget up
        report.row("late", "skipped", setup=lambda: built.append(1) or (lambda: None))  # skipped before its setup

    report.SECTIONS["slow"], report.SECTIONS["late"] = slow, late
    rc = report.main(["--device", "cpu", "--only", "slow,late", "--out", str(out), "--budget", "60",
                      "--section-budget", "slow=0.5,late=30"])
    assert rc == 0
    data = _read(out)
    rows = {r["name"]: r for r in data["rows"]}
    assert "ms" in rows["measured"]
    assert rows["overruns"]["error"].startswith("cut")
    assert "never reached" not in rows
    assert data["sections"]["slow"]["status"].startswith("cut at its")
    assert data["sections"]["slow"]["seconds"] < 2.0  # the alarm held the budget
    assert data["sections"]["late"]["status"] == "done"  # the next section ran after the cut
    assert "ms" in rows["runs"] and "skipped" not in rows and not built
    assert any(s.startswith("late/skipped: past the section's time budget") for s in data["skipped"])
    assert data["complete"] is True


def test_report_killed_from_outside_keeps_the_rows_so_far(tmp_path):
    """The shell's hard limit kills the process: the JSON on disk has every row measured before, incomplete."""
    out = tmp_path / "r.json"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bench import gpu_report
        def section():
            gpu_report.row("fake", "done before the kill", lambda: None)
            print("row written", flush=True)
            time.sleep(60)
        gpu_report.SECTIONS["fake"] = section
        gpu_report.main(["--device", "cpu", "--only", "fake", "--out", {str(out)!r}, "--budget", "120"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    try:
        for line in proc.stdout:
            if line.strip() == "row written":
                break
    finally:
        proc.kill()
        proc.wait()
    data = _read(out)
    assert [r["name"] for r in data["rows"]] == ["done before the kill"]
    assert data["complete"] is False and data["sections"]["fake"]["status"] == "running"


@pytest.mark.triton_kernels
def test_galore_section_without_bitsandbytes_skips_only_the_8bit_rows(report, tmp_path, monkeypatch):
    """As on the GPU image: the 8-bit rows are skipped with the reason, the rest of the section still runs (the
    TF32 rows, the second shape, the refresh)."""
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setattr("weightkit.optim.moments._BNBF", None)  # as in a process that never imported it
    monkeypatch.setattr(report, "GALORE_SHAPES", (((24, 16), 4), ((16, 40), 4)))
    monkeypatch.setattr(report, "REFRESH_SHAPE", (24, 4))
    monkeypatch.setattr(report, "QGALORE_SHAPE", (128, 4))  # Int8Linear groups of 128
    monkeypatch.setenv("GALORE_BACKENDS", "auto")
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--only", "galore", "--out", str(out), "--budget", "300"]) == 0
    data = _read(out)
    assert data["sections"]["galore"]["status"] == "done"
    measured = {r["name"] for r in data["rows"] if "ms" in r}
    skipped = data["skipped"]
    for shape in ("24x16 r4", "16x40 r4"):
        for mode in ("fp32", "tf32"):
            assert f"weightkit GaLoreAdamW auto {mode} {shape}" in measured
            assert any(s.startswith(f"galore/weightkit GaLoreAdamW8bit {mode} {shape}:") and "bitsandbytes" in s
                       for s in skipped), skipped
    assert {"refresh randomized 24^2 r4", "refresh exact 24^2 r4"} <= measured
    assert any(s.startswith("galore/weightkit QGaLoreAdamW8bit") and "bitsandbytes" in s for s in skipped)
    assert not any("error" in r for r in data["rows"]), [r for r in data["rows"] if "error" in r]


def test_report_section_budgets_share_the_total():
    from bench.gpu_report import SECTION_BUDGETS, section_budgets

    everything = section_budgets(list(SECTION_BUDGETS), 90)
    assert abs(sum(everything.values()) - 90) < 1e-6
    assert list(everything) == list(SECTION_BUDGETS)
    assert section_budgets(["quant"], 60) == {"quant": 60}
    assert section_budgets(["quant", "host"], 60, {"host": 5}) == {"quant": 55, "host": 5}


# -- scripts/gpu_check.sh -----------------------------------------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A python that claims a GPU: answers the probe, records every other call, and acts out each stage.
printf '%s\n' "$*" | head -1 >>"$FAKE_LOG"  # one line per call (the probe's code has many)
if [ "$1" = "-c" ] && [[ "$2" == *GPU_CHECK_PROBE* ]]; then
  echo "P_torch=2.11.0+cu130 P_cuda_runtime=13.0 P_cuda=1 P_gpu='Fake H200' P_arch=9.0 P_triton=3.6.0"
  echo "P_bnb='' P_bnb_why='ModuleNotFoundError: No module named bitsandbytes' P_galore_torch=1.0 P_tag=fake-h200"
  echo "P_cudalib=${FAKE_CUDALIB:-} P_cudalib_why='libweightkit_cuda.so not found'"
  exit 0
fi
if [ "$1" = "-c" ]; then exec "$REAL_PYTHON" "$@"; fi
case "$1 $2" in
  "setup.py -q") echo "built"; exit 0 ;;
  "-m weightkit")
    if [ "$3" = info ]; then echo "weightkit info (fake)"; exit 0; fi
    for a in "$@"; do case "$prev" in --out-dir) out="$a" ;; esac; prev="$a"; done
    echo '{"fake": true}' >"$out/train-fake.json"; echo "trained"; exit 0 ;;
  "-m pytest")
    sleep "${FAKE_TEST_SLEEP:-0}"
    echo "SKIPPED [3] tests/optim/test_qgalore.py:12: could not import 'bitsandbytes'"
    echo "======= 5 passed, 3 skipped in 1.00s ======="; exit 0 ;;
  "-m bench.targets") exec "$REAL_PYTHON" "$@" ;;  # the real judge, on the fake files
  "-m bench.gpu_report")
    for a in "$@"; do case "$prev" in --out) out="$a" ;; esac; prev="$a"; done
    echo '{"complete": false, "sections": {"quant": {"status": "running", "budget_s": 50}}, "rows": [{"section": "quant", "name": "row one", "ms": 1.0}], "skipped": []}' >"$out"
    echo "[quant] budget 50 s"
    sleep "${FAKE_REPORT_SLEEP:-0}"; exit 0 ;;
esac
echo "fake python: unexpected call $*" >&2
exit 3
"""


def _run_script(tmp_path, env_extra, out_name="out", timeout=120, root=ROOT):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), REAL_PYTHON=sys.executable,
               RESULTS_DIR=str(tmp_path / "results"), PREBUILT="")  # the checkout's own .gpu-prebuilt: not here
    env.update(env_extra)
    out = tmp_path / out_name
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=root)
    summary = (out / "summary.txt").read_text()
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, summary, calls, out


@needs_tools
def test_script_without_a_gpu_skips_the_gpu_stages_and_says_why(tmp_path):
    """The real script with this machine's python, the GPU hidden (CUDA_VISIBLE_DEVICES empty)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, STAGES="build,info,test,report,train", CUDA_VISIBLE_DEVICES="",
               RESULTS_DIR=str(tmp_path / "results"), PROBE_BUDGET="200", INFO_BUDGET="200")  # a busy CPU machine
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=500,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    head = summary.split("-----")[0]
    assert head.startswith("gpu-check: NO CUDA DEVICE")
    for stage in ("build", "test", "report", "train"):
        assert f"  - {stage}: no CUDA device (" in head, head
    assert "info    ok" in head  # the stage that needs no GPU still ran
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]


@needs_tools
def test_script_runs_the_stages_in_order_and_drops_what_cannot_run(tmp_path):
    proc, summary, calls, out = _run_script(tmp_path, {"FAKE_CUDALIB": "ok"})
    assert proc.returncode == 0, summary
    head = summary.split("-----")[0]
    assert head.startswith("gpu-check: ok")
    stages = [c.split()[1] if c.startswith("-m") else c.split()[0] for c in calls if not c.startswith("-c")]
    assert stages == ["setup.py", "weightkit", "pytest", "bench.gpu_report", "bench.targets", "weightkit",
                      "bench.targets"]
    # the targets, judged from what the call wrote (a fake report of one row: nothing measured), atop the log
    assert "the issues' targets, judged from this call's files" in head
    assert "targets: 0 met, 0 missed," in head and "#26 NOT MEASURED" in head and "#23" not in head
    test_call = next(c for c in calls if c.startswith("-m pytest"))
    assert "-n 14" in test_call and "-k (cuda or tuned_path) and not cudasim" in test_call
    train_call = next(c for c in calls if c.startswith("-m weightkit train"))
    assert "--methods adamw,galore " in train_call + " "  # qgalore needs bitsandbytes: dropped, not started
    assert "train method qgalore: needs bitsandbytes" in head
    assert "bitsandbytes" in head and "site-packages.sh .gpu-site" in head
    assert "tests: 3 skipped" in head
    for stage, limit in (("build", 70), ("info", 10), ("test", 140), ("report", 110), ("train", 50)):
        assert any(line.startswith(f"  {stage}") and "ok" in line and f"/ {limit:4d} s" in line
                   for line in head.splitlines()), (stage, head)
    assert len(list(out.rglob("*"))) <= 9  # 8 files (+ the train folder) come back from the device machine


def _documented_call(first_line):
    """The environment of a call the script's header documents: the comment lines from the one that starts with
    ``first_line`` through its backslash continuations, as NAME=value pairs."""
    import shlex

    lines = SCRIPT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   " + first_line))
    text = ""
    for line in lines[start:]:
        text += line.lstrip("#").strip() + " "
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(text.replace("\\ ", " "))
    assert all("=" in w for w in words), words
    return dict(w.split("=", 1) for w in words)


@needs_tools
def test_documented_second_call_runs_the_report_section_then_the_training_methods(tmp_path):
    """The header's second call that joins galore_issue25 and a 350m training run: the report first, with its own
    limit and section, then the training methods that can run there, each stage under the limit it was given."""
    env = _documented_call("STAGES=report,train")
    assert env["STAGES"] == "report,train" and env["REPORT_SECTIONS"] == "galore_issue25"
    proc, summary, calls, out = _run_script(tmp_path, dict(env, FAKE_CUDALIB="ok"))
    assert proc.returncode == 0, summary
    stages = [c.split()[1] for c in calls if not c.startswith("-c")]
    assert stages == ["bench.gpu_report", "bench.targets", "weightkit", "bench.targets"], calls
    report_call = next(c for c in calls if c.startswith("-m bench.gpu_report"))
    assert f"--budget {int(env['REPORT_BUDGET']) - 20} " in report_call and "--only galore_issue25" in report_call
    train_call = next(c for c in calls if c.startswith("-m weightkit train")) + " "
    assert "--methods adamw,galore-layerwise " in train_call  # qgalore-layerwise needs bitsandbytes: not here
    assert env["TRAIN_ARGS"] in train_call and "--model-size 350m" in train_call
    head = summary.split("-----")[0]
    for stage in ("build", "test"):
        assert f"  - {stage}: not in STAGES" in head, head
    for stage, limit in (("report", int(env["REPORT_BUDGET"])), ("train", int(env["TRAIN_BUDGET"]))):
        assert any(line.startswith(f"  {stage}") and "ok" in line and f"/ {limit:4d} s" in line
                   for line in head.splitlines()), (stage, head)


def _checkout_with_prebuilt(tmp_path, sources_hash=None):
    """A copy of what the scripts read (scripts/, csrc/, setup.py) with a carried .gpu-prebuilt of fake libraries,
    stamped with the copy's sources hash (or ``sources_hash``)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "prebuild_gpu.sh"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copytree(ROOT / "csrc", root / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    pre = root / ".gpu-prebuilt"
    (pre / "weightkit" / "lib").mkdir(parents=True)
    (pre / "weightkit" / "_C.cpython-312-x86_64-linux-gnu.so").write_text("module")
    (pre / "weightkit" / "lib" / "libweightkit_cuda.so").write_text("library")
    (pre / "BUILT").write_text("built (fake)\n")
    here = subprocess.run(["bash", str(root / "scripts" / "prebuild_gpu.sh"), "--hash"], capture_output=True, text=True,
                          check=True, cwd=root).stdout.strip()
    assert len(here) == 16
    (pre / "SOURCES").write_text((sources_hash or here) + "\n")
    return root


@needs_tools
def test_script_uses_carried_libraries_built_from_its_sources_instead_of_building(tmp_path):
    root = _checkout_with_prebuilt(tmp_path)
    proc, summary, calls, out = _run_script(tmp_path, {"FAKE_CUDALIB": "ok", "STAGES": "build,info,report",
                                                       "PREBUILT": ".gpu-prebuilt"}, root=root)
    assert proc.returncode == 0, summary
    head = summary.split("-----")[0]
    assert not any(c.startswith("setup.py") for c in calls)  # no build
    # the build's 70 s less 10 go to the report (110 + 60 = 170 s: --budget 150)
    assert "--budget 150 " in next(c for c in calls if "bench.gpu_report" in c)
    assert any(line.startswith("  report") and "/  170 s" in line for line in head.splitlines()), head
    assert "build: the carried kernel libraries (.gpu-prebuilt, built from these sources) load and run" in head
    assert (root / "weightkit" / "_C.cpython-312-x86_64-linux-gnu.so").read_text() == "module"
    assert (root / "weightkit" / "lib" / "libweightkit_cuda.so").read_text() == "library"
    assert "stages run: info,report;" in summary.splitlines()[0]


@needs_tools
def test_script_builds_when_the_carried_libraries_are_stale_or_do_not_run(tmp_path):
    root = _checkout_with_prebuilt(tmp_path, sources_hash="0123456789abcdef")  # built from other sources
    proc, summary, calls, out = _run_script(tmp_path, {"FAKE_CUDALIB": "ok", "STAGES": "build,info",
                                                       "PREBUILT": ".gpu-prebuilt"}, root=root)
    assert proc.returncode == 0, summary
    assert any(c.startswith("setup.py") for c in calls)
    assert "built from other sources (hash 0123456789abcdef" in summary.split("-----")[0]
    assert not (root / "weightkit" / "lib" / "libweightkit_cuda.so").exists()
    # the sources match but the libraries do not load here (the probe): built, and the log says why
    root = _checkout_with_prebuilt(tmp_path / "second")
    proc, summary, calls, out = _run_script(tmp_path / "second", {"STAGES": "info,report", "REPORT_SECTIONS": "quant",
                                                                  "PREBUILT": ".gpu-prebuilt"}, root=root)
    assert proc.returncode == 0, summary
    assert [c.split()[0] for c in calls if not c.startswith("-c")][:1] == ["setup.py"]  # added: nothing runs here
    assert "the carried kernel libraries (.gpu-prebuilt) do not run here (libweightkit_cuda.so not found)" in summary


@needs_tools
def test_script_stops_a_stage_at_its_limit_and_keeps_its_files(tmp_path):
    proc, summary, calls, out = _run_script(
        tmp_path, {"STAGES": "report", "REPORT_SECTIONS": "quant", "REPORT_BUDGET": "4", "FAKE_REPORT_SLEEP": "30",
                   "FAKE_CUDALIB": "ok"})
    head = summary.split("-----")[0]
    assert proc.returncode == 1
    assert "STOPPED AT ITS 4s LIMIT" in head
    data = json.loads((out / "gpu-report.json").read_text())  # what the report wrote before the kill
    assert data["rows"][0]["name"] == "row one"
    assert "INCOMPLETE" in summary
    assert "build: not in STAGES" in head and "test: not in STAGES" in head
    assert not any(c.startswith("setup.py") for c in calls)  # the library is there: no build added


@needs_tools
def test_script_subset_call_builds_when_the_kernel_library_is_missing(tmp_path):
    proc, summary, calls, out = _run_script(tmp_path, {"STAGES": "report", "REPORT_SECTIONS": "quant"})
    assert proc.returncode == 0, summary
    assert [c.split()[0] for c in calls if not c.startswith("-c")][:1] == ["setup.py"]
    report_call = next(c for c in calls if "bench.gpu_report" in c)
    assert "--only quant" in report_call and "--budget 60" in report_call  # 80 s for a subset, less 20
    assert "build added: no usable CUDA kernel library" in summary.split("-----")[0]


@pytest.mark.triton_kernels
def test_report_cut_comes_again_when_a_library_swallows_it(report, tmp_path):
    """The alarm repeats after the deadline: a row whose code swallows the first cut is cut again."""
    out = tmp_path / "r.json"

    def swallowing():
        try:
            time.sleep(5)
        except BaseException:  # noqa: BLE001 - a library's overly broad handler
            pass
        time.sleep(5)

    report.SECTIONS["greedy"] = lambda: report.row("greedy", "swallows the cut", swallowing)
    assert report.main(["--device", "cpu", "--only", "greedy", "--out", str(out), "--budget", "60",
                        "--section-budget", "greedy=0.3"]) == 0
    data = _read(out)
    assert data["sections"]["greedy"]["status"].startswith("cut")
    assert data["sections"]["greedy"]["seconds"] < 3


@pytest.mark.triton_kernels
def test_every_section_runs_at_toy_sizes(report, tmp_path, monkeypatch):
    """Each section's code end to end on the CPU (Triton through the interpreter), at toy sizes: a section that
    would fail on its first GPU run fails here first. Rows may skip (missing peers), none may fail."""
    for name, value in (("COPY_ELEMS", 1 << 12), ("CEIL", 64), ("QUANT_D", 256), ("QUANT_TOKENS", (1, 5)),
                        ("PROJ", (128, 64, 96)), ("SMALL_PROJ", ((128, 64, "right"), (64, 128, "left"))),
                        ("SMALL_RANK", 64), ("MEM_D", 64), ("MEM_TOKENS", (1, 6)), ("DICT", (128, 40, 20)),
                        ("DICT_TOKENS", (1, 6)), ("KERNELS_D", (256, 128)), ("KERNELS_TOKENS", ((1, 5), (1,))),
                        ("GALORE_SHAPES", (((24, 16), 4),)), ("REFRESH_SHAPE", (24, 4)), ("QGALORE_SHAPE", (128, 4))):
        monkeypatch.setattr(report, name, value)
    monkeypatch.setenv("QUANT_PEERS", "0")
    monkeypatch.setenv("QUANT_COMPILE", "0")  # torch.compile's C++ build takes minutes on a small CPU
    monkeypatch.setenv("GALORE_BACKENDS", "auto")
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--out", str(out), "--budget", "1200"]) == 0
    data = _read(out)
    assert data["complete"] is True
    assert {s: v["status"] for s, v in data["sections"].items()} == {s: "done" for s in report.SECTION_BUDGETS}
    errors = [r for r in data["rows"] if "error" in r]
    assert not errors, errors
    for section in report.SECTION_BUDGETS:
        assert any(r["section"] == section and "ms" in r for r in data["rows"]), section
    # bench/targets.py finds every row it judges in a default report (at the report's sizes, these): no "no row"
    # but for the targeted sections' rows
    from bench import targets

    verdicts = [targets.evaluate(spec, [targets.Report(str(out), data)]) for spec in targets.report_specs()]
    lost = [(v.what, p.why) for v in verdicts for p in v.parts if p.value is None and "no row" in p.why
            and not any(f"no row {s}/" in p.why for s in ("galore_issue25", "qgalore_fused", "compress"))]
    assert not lost, lost
    assert sum(p.value is not None for v in verdicts for p in v.parts) >= 12  # the CPU run measures no kernel time


def test_rows_of_a_bench_module_without_a_time_are_recorded(report, tmp_path):
    """The targeted sections record their bench module's rows (_rows_from): error figures, sync counts and checks
    have no time; they are printed and kept, not a KeyError that loses the section after its GPU work."""
    records = [dict(what="smoke triton left=True", max_abs_err=1e-5, ok=True, predicated_unchanged=True),
               dict(what="host syncs per step GaLoreAdamW raise", syncs=1, at=["a.py:1"], target="<= 1"),
               dict(what="galore-torch tf32 4096x4096 r1024", ms=0.35, baseline=True),
               dict(what="weightkit GaLoreAdamW auto raise tf32 4096x4096 r1024", ms=0.2, baseline_ms=0.35,
                    speedup_vs_baseline=1.75, target=">= 1.5x galore-torch tf32"),
               dict(what="refresh exact 4096^2 r1024", error="RuntimeError: cusolver"),
               dict(section="precision", shape=[8, 8, 2, "left"], who="write-back product bf16x3", rel_err=1e-7)]
    report.SECTIONS["fake"] = lambda: report._rows_from("fake", records)
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--only", "fake", "--out", str(out), "--budget", "60"]) == 0
    data = _read(out)
    assert data["sections"]["fake"]["status"] == "done"
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["smoke triton left=True"]["ok"] is True and "ms" not in rows["smoke triton left=True"]
    assert rows["host syncs per step GaLoreAdamW raise"]["syncs"] == 1
    assert rows["weightkit GaLoreAdamW auto raise tf32 4096x4096 r1024"]["ms"] == 0.2
    assert "cusolver" in rows["refresh exact 4096^2 r1024"]["error"]
    assert rows["precision: [8, 8, 2, 'left'] write-back product bf16x3"]["rel_err"] == 1e-7


@pytest.mark.triton_kernels
def test_qgalore_fused_section_runs_at_toy_sizes_and_its_targets_are_found(report, tmp_path, monkeypatch):
    """The opt-in section of #24 end to end on the CPU (the interpreter), at toy sizes; bench/targets.py then finds
    its precision rows (the write-back's product error against galore-torch's float32 product)."""
    monkeypatch.setattr(report, "QGALORE_FUSED_SIZES", dict(shapes=((128, 128, 32, True), (128, 256, 32, False)),
                                                             moment_shape=(32, 256)))
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--only", "qgalore_fused", "--out", str(out), "--budget", "900"]) == 0
    data = _read(out)
    assert data["sections"]["qgalore_fused"]["status"] == "done", data["sections"]
    assert not [r for r in data["rows"] if r["name"] == "(section failed)"]
    assert any(r["name"].startswith("sr_lowrank_check: ") for r in data["rows"])
    fp16 = [r for r in data["rows"] if "triton float32 out from fp16" in r["name"]]  # left and right, each case
    assert len(fp16) == 2 and all(r.get("rel_err", 1) < 1e-6 for r in fp16), fp16
    f32 = [r for r in data["rows"] if r["name"].endswith(("float32 strict", "float32 split x", "float32 fma"))]
    assert len(f32) == 6 and all(r.get("rel_err", 1) < 1e-6 and "ms" in r for r in f32), f32  # 3 ways, each case
    from bench import targets

    spec = next(s for s in targets.report_specs() if s.what.startswith("Q-GaLore fused write-back"))
    verdict = targets.evaluate(spec, [targets.Report(str(out), data)])
    assert [p.label for p in verdict.parts] == ["128x128 r32 bf16x3", "128x128 r32 tf32x3", "128x256 r32 bf16x3",
                                                "128x256 r32 tf32x3"]
    assert all(p.value is not None for p in verdict.parts), verdict.measured


def test_opt_in_sections_keep_the_rows_measured_before_a_cut(report, tmp_path, monkeypatch):
    """galore_issue25 and qgalore_fused hand their bench module a row list that records each row as it is appended
    (gpu_report._Streamed): a section cut by its time budget (or the stage's kill) mid-table keeps the rows measured
    before, in the report file at once."""
    from bench import galore_issue25 as g25
    from bench import qgalore_fused as qf

    out = tmp_path / "r.json"
    on_disk = []

    def first_then_cut(rows):
        g25._row(rows, "first row", 1.0)
        on_disk.append([r["name"] for r in _read(out)["rows"]])
        raise report.BudgetExceeded("the section's time budget ran out")

    monkeypatch.setattr(g25, "kernel_smoke", first_then_cut)

    def measure(device, rows=None, **sizes):
        rows.append(dict(section="moments", shape=(8, 8), backend="one", ms=2.0))
        on_disk.append([r["name"] for r in _read(out)["rows"]])
        raise report.BudgetExceeded("the section's time budget ran out")

    monkeypatch.setattr(qf, "measure", measure)
    report.main(["--device", "cpu", "--only", "galore_issue25,qgalore_fused", "--out", str(out), "--budget", "60"])
    assert on_disk == [["first row"], ["first row", "moments: (8, 8) one"]], on_disk
    data = _read(out)
    assert [r["name"] for r in data["rows"]] == ["first row", "moments: (8, 8) one"]
    assert data["rows"][0]["ms"] == 1.0 and data["rows"][1]["ms"] == 2.0
    for section in ("galore_issue25", "qgalore_fused"):
        assert data["sections"][section]["status"].startswith("cut at its") and data["sections"][section]["rows"] == 1


@pytest.mark.triton_kernels
def test_galore_issue25_section_runs_at_toy_sizes_and_its_targets_are_found(report, tmp_path, monkeypatch):
    """#25's opt-in section end to end on the CPU (bench/galore_issue25 with DEVICE 'cpu': one step a timing, no
    sync counting; Triton through the interpreter), at toy sizes; every row runs without an error and
    bench/targets.py finds the rows of each of its #25 targets."""
    from bench import galore_issue25 as g25
    from bench import targets

    for name, value in (("CASES", (((48, 32), 8), ((32, 80), 8))), ("REFRESH", (48, 8)), ("SMOKE", (40, 48, 8)),
                        ("SYNCS_CASE", ((32, 32), 8)), ("STEPS", 2), ("REPEATS", 1), ("DEVICE", "cuda"),
                        ("PROJECTION_CASES", (((48, 32), 8),))):
        monkeypatch.setattr(g25, name, value)
    monkeypatch.setattr(report, "GALORE_SHAPES", g25.CASES)
    monkeypatch.setattr(report, "REFRESH_SHAPE", g25.REFRESH)
    out = tmp_path / "r.json"
    assert report.main(["--device", "cpu", "--only", "galore_issue25", "--out", str(out), "--budget", "900"]) == 0
    data = _read(out)
    assert data["sections"]["galore_issue25"]["status"] == "done", data["sections"]
    errors = [r for r in data["rows"] if "error" in r]
    assert not errors, errors
    assert all(r["ok"] for r in data["rows"] if r["name"].startswith("smoke triton"))
    # the refresh's phases, each alone: 3 precisions of the range products, 3 x 2 orthonormalizations, 2 small
    # problems; and the whole refresh with the 'svd' small problem beside the default's
    phases = [r["name"] for r in data["rows"] if r["name"].startswith("refresh phase")]
    assert len(phases) == 11 and all("ms" in r for r in data["rows"] if r["name"] in phases), phases
    assert {"refresh phase small svd tf32 48x48 k16", "refresh phase small gram tf32 48x48 k16"} <= set(phases)
    assert any(r["name"].startswith("refresh small-svd randomized cholqr") and "ms" in r for r in data["rows"])
    projections = {r["name"]: r for r in data["rows"] if r["name"].startswith("projection ")}
    import torch

    from weightkit.ops import galore as galore_ops

    parts = [b for b in ("reference", "cuda", "triton") if galore_ops._PARTS.why_not(b, torch.device("cpu")) is None]
    assert "reference" in parts and ("triton" in parts) == (os.environ.get("TRITON_INTERPRET") == "1"), parts
    ways = ["strict fp32 GEMM", "split bf16x6", "tf32"] + [f"split bf16x6 {b} parts" for b in parts]
    assert sorted(projections) == sorted(f"projection {w} 48x32 r8 left float32 G" for w in ways), sorted(projections)
    assert all(r["rel_err"] < 1e-5 and not r["split_by_default"] for r in projections.values()), projections
    split = [r["rel_err"] for name, r in projections.items() if "split" in name]
    assert max(split) == min(split), split  # every way of making G's parts: the same bits
    parts_rows = [r for r in data["rows"] if r["name"].startswith("bf16_parts ")]
    assert sorted(r["name"] for r in parts_rows) == sorted(f"bf16_parts {b} 48x32 float32" for b in parts)
    assert all(r["GB/s"] == 10 * 48 * 32 / r["ms"] / 1e6 for r in parts_rows), parts_rows
    verdicts = {s.what: targets.evaluate(s, [targets.Report(str(out), data)]) for s in targets.report_specs()
                if s.issue == 25}
    import importlib.util

    baseline = importlib.util.find_spec("galore_torch") is not None  # the steps' ratios need galore-torch's step
    for what, v in verdicts.items():
        if baseline or what.startswith(("GaLoreAdamW8bit", "host syncs", "randomized refresh")):
            assert all(p.value is not None for p in v.parts), (what, v.measured)
            assert "galore_issue25" in v.measured or what.startswith(("host", "randomized")), v.measured


def test_compress_rows_take_the_recorded_2core_cpu_baseline(tmp_path, monkeypatch):
    """The ">= 20x faster than the 2-core CPU run" ratio: gpu_rows finds the CPU run recorded under bench/results/
    for the same layer case and thread count (the newest record first) and reports the speedup; without a matching
    record the row has no ratio (the CPU run is never made in a GPU call)."""
    from bench import test_bench_compress as tbc

    what = "layer 4096x11008 30% 256 tok iters 1"
    fake = {"what": what, "device": "cpu", "seconds": 100.0, "threads": 2, "k": 3, "s": 2, "history": [1.0]}
    monkeypatch.setattr(tbc, "RESULTS_DIR", str(tmp_path))
    tbc.record_cpu_layer(dict(fake, seconds=300.0), str(tmp_path / "cpu-x86-64-2026-12-01-compress-layer.json"))
    tbc.record_cpu_layer(fake, str(tmp_path / "cpu-x86-64-2026-12-06-compress-layer.json"), ["0.2 0.5 0.9"])
    tbc.record_cpu_layer(dict(fake, threads=16, seconds=9.0),
                         str(tmp_path / "cpu-x86-64-2026-12-07-compress-layer.json"))
    found = tbc.recorded_cpu_layer(what, results_dir=str(tmp_path))
    assert found["seconds"] == 100.0 and found["path"].endswith("2026-12-06-compress-layer.json")
    assert found["load_average"] == ["0.2 0.5 0.9"] and found["result"]["history"] == [1.0]
    assert tbc.recorded_cpu_layer(what.replace("30%", "50%"), results_dir=str(tmp_path)) is None

    monkeypatch.setattr(tbc, "time_layer", lambda device, shape: dict(fake, device=device, seconds=4.0))
    rows = []
    tbc.gpu_rows(lambda section, name, **info: rows.append((section, name, info)), minilm=False)
    (section, name, info), = rows
    assert (section, name, info["ms"], info["cpu_seconds"]) == ("compress", what, 4000.0, 100.0)
    assert info["speedup_vs_2core_cpu"] == 25.0 and info["cpu_record"].endswith("2026-12-06-compress-layer.json")
    rows.clear()
    monkeypatch.setattr(tbc, "RESULTS_DIR", str(tmp_path / "none"))
    tbc.gpu_rows(lambda section, name, **info: rows.append((section, name, info)), minilm=False)
    assert "speedup_vs_2core_cpu" not in rows[0][2] and "cpu_record" not in rows[0][2]


@pytest.mark.triton_kernels
def test_report_records_the_compiled_kernels_registers_and_spills(report, monkeypatch):
    """compiled_kernels(): each Triton kernel of weightkit.kernels the process compiled, with the registers and
    spills the driver reported on loading it (a stand-in JITFunction here: nothing compiles without a GPU)."""
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    from weightkit.kernels import int8

    def _probe_kernel(x_ptr, BLOCK):
        pass

    jit = JITFunction(_probe_kernel)
    loaded = SimpleNamespace(metadata=SimpleNamespace(shared=4096, num_warps=8, num_stages=3), n_regs=128,
                             n_spills=24, src=SimpleNamespace(constants={(1,): 64}))  # keyed by argument path
    jit.device_caches = {0: ({"key": loaded}, {}, None, None, None)}
    monkeypatch.setattr(int8, "_probe_kernel", jit, raising=False)
    monkeypatch.setattr(report, "ROWS", [])
    monkeypatch.setattr(report, "write", lambda: None)
    report.compiled_kernels()
    rows = [r for r in report.ROWS if r["name"] == "_probe_kernel"]
    assert rows == [dict(section="compiled", name="_probe_kernel", n_regs=128, n_spills=24, shared=4096,
                         num_warps=8, num_stages=3, constexprs="{'BLOCK': 64}")]


def test_header_train_calls_are_valid_weightkit_train_arguments():
    """Each TRAIN_ARGS / TRAIN_METHODS the script's header proposes for a GPU call parses as `weightkit train`
    arguments and resolves (a typo there would cost a GPU session its targeted call)."""
    import re
    import shlex

    from weightkit import train
    from weightkit.cli import build_parser

    header = "\n".join(line[1:] for line in SCRIPT.read_text().splitlines() if line.startswith("#"))
    header = re.sub(r"\\\n\s*", " ", header)  # continuation lines
    calls = re.findall(r'TRAIN_METHODS=(\S+)[^\n]*?TRAIN_ARGS="([^"]+)"', header)
    assert len(calls) >= 2, calls
    for methods, args in calls:
        ns = build_parser().parse_args(["train", "--methods", methods, *shlex.split(args)])
        assert all(m in train.METHODS for m in ns.methods.split(","))
        cfg = train.TrainConfig(model_size=ns.model_size, steps=ns.steps, checkpointing=ns.checkpointing,
                                svd=ns.svd, stagger_refresh=ns.stagger_refresh, dtype=ns.dtype, tf32=ns.tf32,
                                lowrank_precision=ns.lowrank_precision, device="cuda").resolve()
        assert cfg.tf32  # the targeted calls measure with TF32 allowed (the header says why)
    assert any(c[1].count("--model-size 7b") and "--dtype bfloat16" in c[1] for c in calls)
