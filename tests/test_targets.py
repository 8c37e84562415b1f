"""bench/targets.py: the issues' GPU targets judged from a run's files (no GPU: files made here, and the committed
H200 run of 2026-11-26). Which rows a real report holds is checked in tests/test_gpu_check.py's toy-size run."""

import json
from pathlib import Path

import pytest

from bench import targets as tg

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def _report(path, rows, skipped=(), date="2026-12-08 10:00:00", **extra):
    return _write(path, dict(meta=dict(device="NVIDIA H200", date=date, torch="2.11.0+cu130", triton="3.6.0"),
                             rows=rows, skipped=list(skipped), **extra))


def _row(section, name, ms, kernel_ms=None, **info):
    r = dict(section=section, name=name, ms=ms, **info)
    if kernel_ms is not None:
        r["kernel_ms"] = kernel_ms
    return r


def _verdict(verdicts, start):
    found = [v for v in verdicts if v.what.startswith(start)]
    assert len(found) == 1, [v.what for v in verdicts]
    return found[0]


D = 8192


def _int8_rows(tokens_ms):
    """Quant rows: bf16 nn.Linear 1 ms a call (kernel 0.5 ms), Int8Linear per backend and under auto."""
    rows = []
    for t, (triton, cuda, auto) in tokens_ms.items():
        rows.append(_row("quant", f"bf16 nn.Linear {t}x{D}x{D}", 1.0, 0.5))
        rows.append(_row("quant", f"Int8Linear g128 triton {t} tok", triton, triton / 2))
        rows.append(_row("quant", f"Int8Linear g128 cuda {t} tok", cuda, cuda / 2))
        if auto is not None:
            rows.append(_row("auto", f"Int8Linear g128 bf16 {t} tok", auto, auto / 2))
    return rows


def test_a_layer_is_judged_by_what_auto_ran_and_shows_the_best_backend(tmp_path):
    # kernel time: bf16 0.5 ms; auto 0.3 ms at 1 token (1.67x), 0.32 at 16 (1.56x): met
    rows = _int8_rows({1: (0.6, 0.9, 0.6), 16: (0.64, 0.7, 0.64)})
    v = _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MET, v.measured
    assert "1 tok: 1.67x (auto); best triton 1.67x" in v.measured
    assert "nvidia" not in v.source and "r.json (NVIDIA H200, 2026-12-08" in v.source
    # the eager call: auto 0.6 ms against bf16's 1.0 at 1 token, 0.64 at 16: not slower, met
    assert _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, eager"
                    ).status == tg.MET
    # auto ran the slower backend at 16 tokens (kernel 1.4 ms: 0.36x): missed, though triton alone would meet it
    rows = _int8_rows({1: (0.6, 0.9, 0.6), 16: (0.64, 2.8, 2.8)})
    v = _verdict(tg.judge([_report(tmp_path / "r2.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MISSED and "16 tok: 0.36x (auto); best triton 1.56x" in v.measured
    # no auto section: the fastest backend, named
    rows = _int8_rows({1: (0.9, 0.6, None), 16: (0.64, 0.7, None)})
    v = _verdict(tg.judge([_report(tmp_path / "r3.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MET and "1 tok: 1.67x (cuda; auto not measured)" in v.measured


def test_a_size_not_measured_leaves_the_target_open_unless_another_missed(tmp_path):
    rows = _int8_rows({1: (0.2, 0.9, None)})  # 16 tokens: no row
    v = _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.UNMEASURED
    assert "16 tok: - (no row quant/'Int8Linear g128 <backend> 16 tok')" in v.measured
    rows = _int8_rows({1: (2.0, 3.0, None)})  # 1 token misses: the target is missed whatever 16 tokens would give
    v = _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MISSED
    # a row without the graph replay's kernel time does not count for a kernel-time target
    rows = [_row("quant", f"bf16 nn.Linear 1x{D}x{D}", 1.0), _row("quant", "Int8Linear g128 triton 1 tok", 0.1,
                                                                 graph_error="RuntimeError: capture failed")]
    v = _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.UNMEASURED and "no kernel_ms in" in v.measured and "capture failed" in v.measured
    # a skipped row says why
    v = _verdict(tg.judge([_report(tmp_path / "r.json", [], skipped=[
        "galore/refresh randomized 4096^2 r1024: past the section's time budget"])]), "randomized refresh")
    assert v.status == tg.UNMEASURED and "skipped: past the section's time budget" in v.measured


def test_each_size_comes_from_the_newest_file_that_measured_it(tmp_path):
    old = _report(tmp_path / "old.json", _int8_rows({1: (2.0, 2.0, None), 16: (0.2, 0.2, None)}),
                  date="2026-12-08 09:00:00")
    new = _report(tmp_path / "new.json", _int8_rows({1: (0.2, 0.3, None)}), date="2026-12-08 10:00:00")
    v = _verdict(tg.judge([old, new]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MET  # 1 token from new.json (the old one missed), 16 tokens from old.json
    assert v.source.startswith("new.json") and "old.json" in v.source
    v = _verdict(tg.judge([new, old]), f"Int8Linear {D}² g128, 1, 16 tokens, kernel")
    assert v.status == tg.MISSED  # old.json given last: its 1-token row wins


def test_the_targeted_sections_rows_are_judged(tmp_path):
    rows = [
        # galore_issue25: steps against galore-torch, syncs, refresh
        _row("galore_issue25", "galore-torch tf32 4096x4096 r1024", 0.35),
        _row("galore_issue25", "weightkit GaLoreAdamW auto raise tf32 4096x4096 r1024", 0.2),
        _row("galore_issue25", "galore-torch tf32 4096x11008 r512", 0.5),
        _row("galore_issue25", "weightkit GaLoreAdamW auto raise tf32 4096x11008 r512", 0.4),
        dict(section="galore_issue25", name="host syncs per step GaLoreAdamW raise", syncs=1),
        dict(section="galore_issue25", name="host syncs per step GaLoreAdamW8bit raise", syncs=1),
        dict(section="galore_issue25", name="host syncs per step GaLoreAdamW skip", syncs=0),
        dict(section="galore_issue25", name="host syncs per step GaLoreAdamW8bit skip", syncs=2),
        _row("galore_issue25", "refresh randomized cholqr range bf16 tf32 4096^2 r1024", 31.0),
        _row("galore_issue25", "refresh randomized householder range fp32 strict fp32 4096^2 r1024", 90.0),
        # qgalore_fused: the precision contract (rows as gpu_report's _rows_from names them)
        *[dict(section="qgalore_fused", name=f"precision: [4096, {n}, 1024, '{side}'] {who}", rel_err=err)
          for n, side in ((4096, "left"), (11008, "right"))
          for who, err in (("float32 matmul (galore-torch's)", 2e-7), ("write-back product bf16x3", 1e-7),
                           ("write-back product tf32x3", 5e-7 if n == 4096 else 3e-7))],
        # compress
        _row("compress", "layer 4096x11008 30% 256 tok iters 1", 4200.0, speedup_vs_2core_cpu=785.0),
        _row("compress", "MiniLM 37 layers 30% dictionary", 21000.0, cosine=0.745, cosine_gap=0.003),
    ]
    verdicts = tg.judge([_report(tmp_path / "r.json", rows)])
    v = _verdict(verdicts, "GaLoreAdamW step, TF32 allowed")
    assert v.status == tg.MISSED  # 1.75x and 1.25x: the second shape misses
    assert "4096x4096 r1024: 1.75x (galore_issue25)" in v.measured and "4096x11008 r512: 1.25x" in v.measured
    v = _verdict(verdicts, "host syncs")
    assert v.status == tg.MISSED and "GaLoreAdamW8bit skip: 2 (at most 0)" in v.measured
    v = _verdict(verdicts, "randomized refresh")
    assert v.status == tg.MET and "31.0 ms (refresh randomized cholqr range bf16 tf32" in v.measured
    v = _verdict(verdicts, "Q-GaLore fused write-back")
    assert v.status == tg.MISSED and "4096x4096 r1024 bf16x3: 1.00e-07 = 0.50x" in v.measured
    assert "4096x4096 r1024 tf32x3: 5.00e-07 = 2.50x" in v.measured
    assert "4096x11008 r1024 tf32x3: 3.00e-07 = 1.50x" in v.measured
    assert _verdict(verdicts, "compress one").status == tg.MET
    assert _verdict(verdicts, "MiniLM").status == tg.MET
    rows[-1] = _row("compress", "MiniLM 37 layers 30% dictionary", 21000.0, cosine=0.735, cosine_gap=0.013)
    assert _verdict(tg.judge([_report(tmp_path / "r.json", rows)]), "MiniLM").status == tg.MISSED


def test_a_miss_past_the_bytes_bound_says_so(tmp_path):
    """Decode and bandwidth rows carry the best figure the bytes they must move allow at the run's copy bandwidth;
    a miss that no kernel could avoid on that device is marked."""
    m = 4096
    assert tg.memory_linear_bytes(m, 1) == 512 * m * 2 + 2 * m * 2  # one row of each of the 512 tables
    assert 1.9 < tg.memory_linear_bytes(m, 16) / (2 * m * m) < 2.0  # 15.5 rows a table: twice a bf16 4096^2 weight
    mem = [_row("memoryformer", f"bf16 nn.Linear {m}^2 {t} tok", 0.02, kernel_ms) for t, kernel_ms in
           ((1, 0.010), (16, 0.012))]
    mem += [_row("memoryformer", f"MemoryLinear bfloat16 triton {t} tok", 0.05, kernel_ms) for t, kernel_ms in
            ((1, 0.008), (16, 0.030))]
    mem.append(_row("memoryformer", "MemoryLinear bfloat16 triton 1024 tok", 0.40))
    int4 = [_row("quant", f"bf16 nn.Linear {t}x{D}x{D}", 0.06, 0.05) for t in (1, 16)]
    int4 += [_row("quant", f"int4_matmul g64 triton {t} tok", 0.03, 0.025,
                  bytes=D * D // 2 + D * D // 64 * 5 + 4 * t * D) for t in (1, 16)]

    def judged(copy_gbps):
        return tg.judge([_report(tmp_path / f"r{copy_gbps}.json", mem + int4, copy_GBps=copy_gbps)])

    verdicts = judged(4000.0)
    v = _verdict(verdicts, f"MemoryLinear {m}, bf16 tables, 1, 16 tokens")
    assert v.status == tg.MISSED  # 1.25x and 0.40x against 2x
    bound16 = 0.012 / (tg.memory_linear_bytes(m, 16) / 4000.0 / 1e6)
    assert f"16 tok: 0.40x (triton; auto not measured); bytes bound {bound16:.2f}x" in v.measured
    assert v.measured.endswith("[past the bytes bound on this device: 16 tok]"), v.measured  # 1 tok could: 9.5x
    v = _verdict(verdicts, f"MemoryLinear {m}, bf16 tables, 1024 tokens")
    assert v.status == tg.MISSED and "bytes floor 0.268 ms" in v.measured and "past the bytes" not in v.measured
    v = _verdict(verdicts, f"int4_matmul {D}² g64")
    assert v.status == tg.MISSED and "1 tok: 2.00x (triton); bytes bound 5.15x" in v.measured  # 38.8 MB
    assert "past the bytes" not in v.measured
    # an H100's copy bandwidth: the bytes of 1024 tokens alone take longer than the 0.35 ms asked for
    v = _verdict(judged(3000.0), f"MemoryLinear {m}, bf16 tables, 1024 tokens")
    assert "bytes floor 0.357 ms" in v.measured and v.measured.endswith("on this device: 1024 tok]"), v.measured
    # a report without the copy bandwidth: the figures alone, as before
    v = _verdict(tg.judge([_report(tmp_path / "plain.json", mem)]), f"MemoryLinear {m}, bf16 tables, 1, 16 tokens")
    assert v.status == tg.MISSED and "bound" not in v.measured


def _train(path, size, results, **config):
    return _write(path, dict(config=dict(model_size=size, batch_size=8, seq_len=512, rank=256, steps=20, **config),
                             device="NVIDIA H200", date="2026-12-08", results=results))


def _result(method, step_ms, peak_mb, longest=None):
    return dict(method=method, step_ms_median=step_ms, step_ms_max=longest or step_ms * 1.1, step_ms_max_at=7,
                peak_memory_mb=peak_mb, tokens_per_s_median=4096e3 / step_ms, error=None)


def test_training_runs_judge_the_end_to_end_rows(tmp_path):
    f350 = _train(tmp_path / "train-350m.json", "350m", [
        _result("adamw", 100.0, 10000), _result("galore", 95.0, 9000, longest=180.0),
        _result("galore-layerwise", 99.0, 7000), _result("qgalore-layerwise", 125.0, 6000)], stagger_refresh=True)
    f7b = _train(tmp_path / "train-7b.json", "7b", [_result("adamw", 1000.0, 60000),
                                                    _result("qgalore-layerwise", 1400.0, 12000)], checkpointing=True)
    verdicts = tg.judge([f350, f7b])
    v = _verdict(verdicts, "e2e 350m (303M) LLaMA-style, 8 x 512, Q-GaLore")
    assert v.status == tg.MET and "1.25x the step time" in v.measured and "peak 60%" in v.measured
    v = _verdict(verdicts, "LLaMA-7B")
    assert v.status == tg.MISSED  # 12000 MiB = 12.58 GB (met), tokens/s 0.71x AdamW's (missed)
    assert "peak 12.58 GB" in v.measured and "tokens/s 0.71x" in v.measured and "checkpointing" in v.source
    v = _verdict(verdicts, "e2e 350m (303M), bf16 autocast")
    assert v.status == tg.MET, v.measured  # 0.95x / 0.99x AdamW's step, longest 1.89x median, layer-wise peak 70%
    # a run without staggered refreshes cannot meet the longest-step row; a CPU run is not judged
    f350 = _train(tmp_path / "train-350m.json", "350m", [_result("adamw", 100.0, 10000), _result("galore", 95.0, 9000),
                                                         _result("galore-layerwise", 99.0, 7000)])
    assert _verdict(tg.judge([f350]), "e2e 350m (303M), bf16 autocast").status == tg.UNMEASURED
    cpu = json.loads(Path(f350).read_text())
    cpu["device"] = "x86_64 CPU x2"
    assert "no CUDA training run" in _verdict(tg.judge([_write(tmp_path / "cpu.json", cpu)]),
                                              "e2e 350m (303M), bf16 autocast").measured


def test_summaries_judge_the_check_and_a_subset_call(tmp_path):
    whole = _write(tmp_path / "s1.txt", "gpu-check: ok (402 s, finished; stages run: build,info,test,report,train; "
                                        "started 2026-12-08T10:00:00Z)\n")
    subset = _write(tmp_path / "s2.txt", "gpu-check: ok (191 s, finished; stages run: build,report; started x)\n")
    verdicts = tg.judge([whole, subset])
    assert _verdict(verdicts, "make gpu-check, every stage").status == tg.MET
    assert _verdict(verdicts, "a second call").status == tg.MISSED
    failed = _write(tmp_path / "s3.txt", "gpu-check: FAILED (300 s, finished; stages run: build,info,test,report,"
                                         "train; started x)\n")
    assert _verdict(tg.judge([failed]), "make gpu-check, every stage").status == tg.MISSED


def test_the_h200_run_of_2026_11_26_is_judged_from_its_files(capsys):
    files = tg.default_files(str(RESULTS))
    assert any(f.endswith("nvidia-h200-2026-11-26-gpu-report.json") for f in files), files
    assert any(f.endswith("nvidia-h200-train-350m-cuda-2026-11-26.json") for f in files), files
    verdicts = tg.judge(files)
    v = _verdict(verdicts, f"Int8Linear {D}² g128, 1, 16 tokens, eager")
    assert v.status == tg.MISSED and "1 tok: 0.26x (triton; auto not measured)" in v.measured
    assert _verdict(verdicts, f"Int8Linear {D}² g128, 1, 16 tokens, kernel").status == tg.UNMEASURED  # no replay
    assert _verdict(verdicts, "GaLoreAdamW8bit step").status == tg.MET  # 1.19x and 1.06x GaLoreAdamW's time
    assert "not staggered" in _verdict(verdicts, "e2e 350m (303M), bf16 autocast").measured
    assert tg.main(["--style", "markdown", "--issues", "25"] + files) == 0
    out = capsys.readouterr().out
    assert out.startswith("targets: 1 met, ") and "| #25 |" in out and "| #24 |" not in out


def test_files_that_are_not_run_files_are_left_out_with_a_note(tmp_path, capsys):
    junk = _write(tmp_path / "x.json", {"fake": True})
    assert tg.main([junk]) == 0
    out = capsys.readouterr().out
    assert "left out" in out and "x.json" in out and "targets: 0 met, 0 missed" in out


@pytest.mark.parametrize("pattern, readable", [
    (r"Int8Linear g128 (?P<b>\w+) 1 tok", "Int8Linear g128 <backend> 1 tok"),
    (r"MemoryLinear fwd\+bwd float32 (?P<b>\w+) 9 tok table grad (?P<mode>\w+)",
     "MemoryLinear fwd+bwd float32 <backend> 9 tok table grad <mode>"),
    (r"DictLinear bf16 k1 s2 \((?P<fewer>[\w% ]*)\) (?P<b>\w+) 1 tok",
     "DictLinear bf16 k1 s2 (<fewer>) <backend> 1 tok"),
])
def test_row_patterns_read_as_row_names(pattern, readable):
    assert tg._readable(pattern) == readable


def test_the_committed_targets_page_is_current():
    page = tg.page(tg.default_files(str(RESULTS)))
    committed = (ROOT / "docs" / "targets.md").read_text()
    assert committed == page, "docs/targets.md is stale: run `make docs` and commit it"
