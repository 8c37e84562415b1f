"""The main job (weightkit train): every method learns on real text; measurements are real; each method has its own
documented learning rate with warmup and cosine decay; a clean run prints no warnings."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from weightkit import train
from weightkit.data import byte_corpus, windows
from weightkit.models import TinyLlama
from weightkit.models.llama import PRESETS, num_parameters, preset, unigram_entropy_bits
from weightkit.optim import GaLoreAdamW, QGaLoreAdamW8bit

TINY = dict(steps=60, batch_size=8, seq_len=64, lr=3e-3, rank=16, update_proj_gap=20, dim=64, n_layers=2, n_heads=4,
            eval_every=10)


def test_corpus_is_real_text():
    tr, va = byte_corpus()
    assert len(tr) > 300_000 and len(va) > 10_000
    text = bytes(tr[:2000].to(torch.uint8).tolist()).decode("utf-8", errors="replace")
    assert " the " in text


def test_eval_windows_cover_the_split_in_order():
    data = torch.arange(100)
    x, y = windows(data, 10)
    assert x.shape == (9, 10) and torch.equal(x.flatten(), torch.arange(90)) and torch.equal(y, x + 1)
    assert windows(data, 10, max_windows=3)[0].shape == (3, 10)
    with pytest.raises(ValueError, match="longer than the split"):
        windows(data[:5], 10)


@pytest.mark.parametrize("method", train.METHODS)
def test_method_learns(method):
    if method.startswith("qgalore"):
        pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    cfg = train.TrainConfig(**TINY)
    result = train.run(method, cfg, progress=False)
    unigram_nats = unigram_entropy_bits(byte_corpus()[0]) * math.log(2)
    assert result.train_loss[0] < math.log(256) + 0.5
    assert result.val_loss < unigram_nats, f"{method}: val loss {result.val_loss:.3f} not below unigram {unigram_nats:.3f}"
    assert result.optimizer_state_bytes > 0 and result.tokens_per_s > 0 and result.peak_rss_mb > 0
    assert result.lr == 3e-3 and result.timed_from == 6 and result.tokens_per_s_median > 0
    assert result.peak_memory_kind == "peak RSS" and result.peak_memory_mb == result.peak_rss_mb
    assert result.steps == list(range(10, 61, 10)) and result.autocast is None


def test_galore_three_ways_train_alike():
    """GaLoreAdamW, LayerwiseGaLore (updates inside backward, each gradient freed in its hook) and the reference
    galore-torch take the same steps from the same start: the same losses."""
    cfg = train.TrainConfig(**dict(TINY, steps=8, eval_every=2))
    methods = ["galore", "galore-layerwise"]
    try:
        import galore_torch  # noqa: F401

        methods.append("galore-torch")
    except ImportError:
        pass
    runs = {m: train.run(m, cfg, progress=False) for m in methods}
    want = runs["galore"].train_loss
    for m, r in runs.items():
        assert r.train_loss == pytest.approx(want, rel=1e-5, abs=1e-6), m
        assert 0 < r.step_ms_median <= r.step_ms_max and 2 <= r.step_ms_max_at <= cfg.steps, m
    assert runs["galore-layerwise"].optimizer_impl.startswith("LayerwiseGaLore of weightkit.optim")


def test_qgalore_layerwise_steps_int8_weights_in_backward():
    """Q-GaLore layer-wise: each Int8Linear weight is updated from its post-accumulate-grad hook during backward
    (its gradient is an ordinary .grad) and the gradient freed there; nothing is left for a step() call, no
    weightkit-specific hook is on the layers (autocast is the layer's own), and the model learns."""
    pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    from weightkit.nn import Int8Linear

    cfg = train.TrainConfig(**dict(TINY, steps=3)).resolve()
    model = train.prepare_model("qgalore-layerwise", cfg)
    opt = train.build_optimizer("qgalore-layerwise", model, cfg)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(any(p is m.weight for p in opt.params) for m in int8)
    before = [m.weight.detach().clone() for m in int8]
    x = torch.randint(0, 256, (2, 16))
    model(x, x).backward()
    assert not any(m._forward_pre_hooks for m in int8)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    assert sum(not torch.equal(b, m.weight) for b, m in zip(before, int8)) > 0
    r = train.run("qgalore-layerwise", train.TrainConfig(**dict(TINY, checkpointing=True)), progress=False)
    unigram_nats = unigram_entropy_bits(byte_corpus()[0]) * math.log(2)
    assert r.val_loss < unigram_nats and r.optimizer_impl.startswith("LayerwiseGaLore of weightkit.optim")
    # the peak's breakdown (weightkit.memory), printed beside the measured peak
    parts = r.memory_breakdown
    assert parts["peak"] == int(r.peak_memory_mb * 2**20) and parts["weights"] == r.weight_bytes
    assert parts["optimizer_state"] == r.optimizer_state_bytes and parts["activations"] > 0
    assert "peak memory breakdown" in train.report([r]) and "measured peak" in train.report([r])


def test_layerwise_schedule_sets_every_parameter_rate():
    cfg = train.TrainConfig(**dict(TINY, steps=10, warmup=0.2)).resolve()
    model = train.prepare_model("galore-layerwise", cfg)
    opt = train.build_optimizer("galore-layerwise", model, cfg, lr=1e-2)
    sched = train.make_scheduler(opt, cfg)
    x = torch.randint(0, 256, (2, 16))
    for step in range(4):
        want = 1e-2 * train.lr_factor(step, 10, 0.2, 0.1)
        rates = [g["lr"] for o in opt.optimizers for g in o.param_groups]
        assert rates == pytest.approx([want] * len(rates))
        model(x, x).backward()  # each parameter steps in its hook, at this rate
        sched.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # freed by the hooks


@pytest.mark.parametrize("method", ["galore", "galore-layerwise", "qgalore"])
def test_randomized_svd_and_staggered_refresh_reach_the_optimizer(method):
    if method == "qgalore":
        pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    cfg = train.TrainConfig(**dict(TINY, steps=3, eval_every=3, svd="randomized",
                                   stagger_refresh=method != "qgalore")).resolve()
    model = train.prepare_model(method, cfg)
    opt = train.build_optimizer(method, model, cfg)
    opts = opt.optimizers if method == "galore-layerwise" else [opt]
    assert all(g["svd"] == "randomized" for o in opts for g in o.param_groups if "rank" in g)
    if method != "qgalore":
        assert all(o.parts.refresh.stagger for o in opts)
    r = train.run(method, cfg, progress=False)
    assert all(math.isfinite(v) for v in r.train_loss)
    with pytest.raises(ValueError, match="svd must be one of"):
        train.TrainConfig(svd="fast").resolve()


def test_activation_checkpointing_recomputes_the_same_training():
    cfg = train.TrainConfig(**dict(TINY, steps=4, eval_every=2))
    plain = train.run("adamw", cfg, progress=False)
    ckpt = train.run("adamw", dataclasses.replace(cfg, checkpointing=True), progress=False)
    assert ckpt.train_loss == pytest.approx(plain.train_loss, rel=1e-6)
    model = train.prepare_model("adamw", dataclasses.replace(cfg, checkpointing=True))
    assert model.gradient_checkpointing


@pytest.mark.parametrize("method", ["adamw", "galore-layerwise", "qgalore-layerwise"])
def test_bfloat16_parameters_train_and_keep_half_the_activations(method):
    """--dtype bfloat16 (the papers' runs): every float parameter is bf16 (Q-GaLore's Int8Linear weights int8 with
    bf16 as their float dtype), the model learns, and with checkpointing the kept activations (the blocks' inputs,
    the recomputed block) are at most 0.7x those of float32 parameters."""
    if method.startswith("qgalore"):
        pytest.importorskip("bitsandbytes")
    from weightkit.memory import activation_bytes

    cfg = train.TrainConfig(**dict(TINY, dtype="bfloat16", checkpointing=True))
    model = train.prepare_model(method, cfg)
    floats = [p for p in model.parameters() if p.dtype != torch.int8]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    if method.startswith("qgalore"):
        from weightkit.nn import Int8Linear

        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert int8 and all(m.weight.dtype == torch.bfloat16 and m.weight.qdata.dtype == torch.int8 for m in int8)
    x = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    half = activation_bytes(model, x, x)
    full = activation_bytes(train.prepare_model(method, dataclasses.replace(cfg, dtype="float32")), x, x)
    assert half <= 0.7 * full, (half, full)  # (the norms and the loss compute in float32 either way)
    result = train.run(method, cfg, progress=False)
    unigram_nats = unigram_entropy_bits(byte_corpus()[0]) * math.log(2)
    assert math.isfinite(result.val_loss) and result.val_loss < unigram_nats
    assert "bf16 parameters" in train.describe(cfg)[0]
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, got 'float16'"):
        dataclasses.replace(cfg, dtype="float16").resolve()


def test_low_rank_state_is_smaller_than_adamw():
    cfg = train.TrainConfig(**dict(TINY, steps=2, eval_every=1))
    states = {m: train.run(m, cfg, progress=False).optimizer_state_bytes for m in ("adamw", "galore")}
    assert states["galore"] < states["adamw"]


def test_tensor_bytes_counts_each_tensor_once():
    a = torch.zeros(10)
    state = {"x": {"m": a, "v": a.view(10)}, "y": [torch.zeros(3, dtype=torch.float16)]}
    assert train.tensor_bytes(state) == 40 + 6


def test_presets_follow_the_galore_configs_and_count_parameters():
    assert PRESETS["350m"] == (1024, 24, 16, 2736) and PRESETS["60m"] == (512, 8, 8, 1376)
    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = TinyLlama(cfg)
        assert num_parameters(cfg) == sum(p.numel() for p in model.parameters()), name
    assert num_parameters(preset("350m")) >= 300_000_000
    assert num_parameters(preset("tiny")) == sum(p.numel() for p in TinyLlama(preset("tiny")).parameters())
    assert preset("tiny", dim=64).hidden_dim == 192  # a new width takes the SwiGLU rule
    with pytest.raises(ValueError, match="heads of even size"):
        preset("tiny", dim=60, n_heads=4)
    assert PRESETS["1b"] == (2048, 24, 32, 5461) and PRESETS["7b"] == (4096, 32, 32, 11008)  # GaLore's 1B / 7B
    assert num_parameters(preset("7b")) > 6_000_000_000
    with pytest.raises(ValueError, match="unknown model size"):
        preset("13b")


def test_config_resolves_from_the_size():
    cfg = train.TrainConfig(model_size="350m").resolve()
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.rank, cfg.update_proj_gap) == (1024, 24, 16, 2736, 256, 200)
    assert (cfg.batch_size, cfg.seq_len) == (8, 512)
    cfg = train.TrainConfig(model_size="7b").resolve()  # #24's memory row: rank 1024, 16 x 256 tokens
    assert (cfg.dim, cfg.rank, cfg.batch_size, cfg.seq_len) == (4096, 1024, 16, 256)
    assert train.TrainConfig(dim=64).resolve().rank == 16  # another width: d/4
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        train.TrainConfig(steps=0).resolve()
    with pytest.raises(ValueError, match="rank=512 is larger"):
        train.TrainConfig(rank=512).resolve()
    with pytest.raises(ValueError, match="unknown model size"):
        train.TrainConfig(model_size="huge").resolve()


def test_learning_rates_per_method_with_sources():
    cfg = train.TrainConfig(model_size="350m")
    assert cfg.lr_for("adamw")[0] == 1e-3 and cfg.lr_for("galore")[0] == 1e-2 and cfg.lr_for("qgalore")[0] == 1e-2
    assert train.TrainConfig().lr_for("qgalore")[0] == 1.5e-2
    assert "2403.03507" in cfg.lr_for("galore")[1] and "2407.08296" in cfg.lr_for("qgalore")[1]
    cfg = train.TrainConfig(lr=3e-3, lrs={"galore": 2e-2})
    assert cfg.lr_for("galore") == (2e-2, "--lr") and cfg.lr_for("adamw")[0] == 3e-3
    assert set(train.LR_TABLE) == set(train.METHODS) == set(train.LR_SOURCES)
    assert all(set(v) == set(train.SIZES) for v in train.LR_TABLE.values())


def test_lr_specs():
    assert train.parse_lr_spec("adamw=1e-3, galore=1e-2") == ({"adamw": 1e-3, "galore": 1e-2}, None)
    assert train.parse_lr_spec("3e-3") == ({}, 3e-3)
    for bad, msg in [("adamw", "not a number"), ("sgd=1e-3", "unknown method 'sgd'"), ("adamw=x", "not a number"),
                     ("adamw=-1", "> 0"), ("adamw=nan", "> 0"), ("adamw=1e-3,adamw=2e-3", "given twice"),
                     ("adamw:1e-3,galore=1", "METHOD=VALUE"), ("", "empty")]:
        with pytest.raises(ValueError, match=msg):
            train.parse_lr_spec(bad)
    assert train.parse_sweep_spec("", ["adamw", "galore"]) == {"adamw": None, "galore": None}
    assert train.parse_sweep_spec("galore=3e-2:1e-2", ["adamw", "galore"]) == {"adamw": None, "galore": [1e-2, 3e-2]}
    with pytest.raises(ValueError, match="not among --methods"):
        train.parse_sweep_spec("qgalore=1e-2", ["adamw"])


def test_resolve_device():
    assert train.resolve_device("cpu") == "cpu"
    assert train.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        train.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            train.resolve_device("cuda")


def test_schedule_warms_up_then_decays_to_ten_percent():
    f = [train.lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert train.lr_factor(0, 1) == 1.0 and train.lr_factor(0, 3) == 1.0  # no warmup step in a 3-step run


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, GaLoreAdamW, QGaLoreAdamW8bit])
def test_lambda_lr_drives_every_optimizer(opt_cls):
    """GaLoreAdamW / QGaLoreAdamW8bit subclass torch.optim.Optimizer: LambdaLR sets each group's lr, which their
    step reads (the update shrinks with the rate)."""
    if opt_cls is QGaLoreAdamW8bit:
        pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    cfg = train.TrainConfig(**dict(TINY, steps=10, warmup=0.2)).resolve()
    method = {torch.optim.AdamW: "adamw", GaLoreAdamW: "galore", QGaLoreAdamW8bit: "qgalore"}[opt_cls]
    model = train.prepare_model(method, cfg)
    opt = train.build_optimizer(method, model, cfg, lr=1e-2)
    assert type(opt) is opt_cls
    sched = train.make_scheduler(opt, cfg)
    seen = []
    x = torch.randint(0, 256, (2, 16))
    for _ in range(cfg.steps):
        seen.append([g["lr"] for g in opt.param_groups])
        model(x, x).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    expected = [1e-2 * train.lr_factor(s, 10, 0.2, 0.1) for s in range(10)]
    assert all(lrs == pytest.approx([e] * len(lrs)) for lrs, e in zip(seen, expected))


def test_int8_group_sizes_fit_each_layer():
    assert train.int8_group_size(1024) == 128 and train.int8_group_size(2736) == 16 and train.int8_group_size(704) == 64
    model = train.prepare_model("qgalore", train.TrainConfig(dim=64, n_layers=1, hidden_dim=96))
    from weightkit.nn import Int8Linear

    groups = {n.split(".")[-1]: m.group_size for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert groups == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64,
                      "down_proj": 32}
    assert type(model.lm_head) is torch.nn.Linear


def test_sweep_picks_the_lowest_validation_loss():
    cfg = train.TrainConfig(**dict(TINY, steps=6, eval_every=3, lr=None))
    (r,) = train.compare(["galore"], cfg, isolate=False, sweep_rates={"galore": [1e-3, 3e-2]}, sweep_steps=4,
                         progress=False)
    assert [t["lr"] for t in r.sweep] == [1e-3, 3e-2]
    best = min(r.sweep, key=lambda t: t["val_loss"])
    assert best["chosen"] and r.lr == best["lr"] and r.lr_source.startswith("sweep")
    text = train.report([r], cfg)
    assert "| lr sweep |" in text and "chosen" in text and "galore lr" in text


def test_compare_keeps_going_after_a_failure(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setitem(train._CHILD_FUNCS, "run", boom)
    (r,) = train.compare(["adamw"], train.TrainConfig(**TINY), isolate=False, keep_going=True, progress=False)
    assert r.error == "boom" and "failed: boom" in train.report([r])


def test_cli_train_clean_run_writes_json_and_plot(tmp_path):
    """A clean CPU run of all three methods with every Python warning turned into an error (the spawned method
    processes inherit -W error) and nothing on stderr but the progress bars."""
    pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "weightkit", "train", "--device", "cpu", "--steps", "4",
                           "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--layers", "1",
                           "--lr", "galore=2e-2", "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    noise = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]  # tqdm
    assert not noise, noise
    for m in train.DEFAULT_METHODS:
        assert f"| {m} |" in proc.stdout
    assert "0.03M parameters (32,864)" in proc.stdout
    assert re.search(r"estimated time: about \d+ (seconds|minutes) for 3 method\(s\) x 4 steps", proc.stdout)
    files = sorted(os.listdir(tmp_path))
    (js,) = [f for f in files if f.endswith(".json")]
    assert any(f.endswith(".png") for f in files)
    data = json.load(open(tmp_path / js))
    res = {r["method"]: r for r in data["results"]}
    assert set(res) == set(train.DEFAULT_METHODS)
    assert (res["adamw"]["lr"], res["galore"]["lr"], res["qgalore"]["lr"]) == (1e-3, 2e-2, 1.5e-2)
    assert res["galore"]["lr_source"] == "--lr" and "2407.08296" in res["qgalore"]["lr_source"]
    for r in res.values():
        assert r["error"] is None and r["tokens_per_s"] > 0 and r["timed_from"] == 1
        assert r["peak_memory_mb"] > 0 and r["peak_memory_kind"] == "peak RSS" and r["n_params"] == 32_864
    assert data["config"]["model_size"] == "tiny" and data["lr_table"]["galore"]["350m"] == 1e-2


def test_cli_train_refuses_bad_arguments(capsys, tmp_path):
    """One line on stderr and exit status 2, before any work (tests/test_cli.py checks the other commands)."""
    from weightkit.cli import main

    def status(argv):
        try:
            return main(argv)
        except SystemExit as exc:  # argparse's own errors (types, choices)
            return exc.code

    cases = [(["--methods", "sgd"], "unknown method 'sgd'"),
             (["--device", "tpu"], "--device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
             (["--lr", "adamw=fast"], "--lr adamw: 'fast' is not a number"),
             (["--lr", "sgd=1e-3"], "--lr: unknown method 'sgd'"),
             (["--lr-sweep", "galore=1e-2", "--methods", "adamw"], "not among --methods"),
             (["--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
             (["--seq-len", "100000"], "seq_len=100000 is longer than the validation split allows"),
             (["--eval-every", "0"], "argument --eval-every: must be an int >= 1"),
             (["--warmup", "1"], "argument --warmup: must be a number in [0, 1), got 1"),
             (["--rank", "999"], "rank=999 is larger than the model width"),
             (["--model-size", "13b"], "invalid choice: '13b'"),
             (["--methods", "adamw,adamw"], "a method is given twice"),
             (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
             (["--lowrank-precision", "fp16"], "argument --lowrank-precision: invalid choice: 'fp16'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device: cuda was requested but torch"))
    # a 7B model on the CPU (16 bytes a parameter for weights, gradients and moments: ~96 GiB): refused before any
    # work instead of running into the OOM killer
    cases.append((["--model-size", "7b", "--device", "cpu"], "more than the"))
    for argv, msg in cases:
        assert status(["train", *argv, "--out-dir", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("weightkit train: "), (argv, err)
    assert not os.path.exists(tmp_path / "out")  # nothing was done


@pytest.mark.parametrize("method", ["qgalore", "qgalore-layerwise"])
def test_tf32_and_lowrank_precision_reach_the_run(method, monkeypatch):
    """--tf32 allows TF32 while a method trains and puts torch's switches back after; --lowrank-precision reaches
    QGaLoreAdamW8bit (per parameter in layer-wise mode); both are in the description, and bad values are refused."""
    pytest.importorskip("bitsandbytes")
    seen = []
    build = train.build_optimizer

    def recording(*args, **kwargs):
        opt = build(*args, **kwargs)
        opts = opt.optimizers if hasattr(opt, "optimizers") else [opt]
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     {part.precision for o in opts for part in o.parts.weights if hasattr(part, "precision")}))
        return opt

    monkeypatch.setattr(train, "build_optimizer", recording)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cfg = train.TrainConfig(**dict(TINY, steps=4, eval_every=2, tf32=True, lowrank_precision="bf16"))
    train.run(method, cfg, progress=False)
    assert seen == [(True, True, {"bf16"})]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    text = train.describe(cfg)[1]
    assert "TF32 matmuls allowed" in text and "Q-GaLore write-back product in bf16" in text
    with pytest.raises(ValueError, match="lowrank_precision must be one of fp32, tf32x3, bf16x3, bf16, got 'fp16'"):
        dataclasses.replace(cfg, lowrank_precision="fp16").resolve()


def test_cpu_memory_guard_counts_the_parameters_dtype(monkeypatch):
    """The CPU guard needs 16 bytes a parameter in float32 (weights, gradients, AdamW's two moments), 8 in bfloat16."""
    from weightkit import cli

    cfg = train.TrainConfig(model_size="1b").resolve()
    n = num_parameters(cfg.model_config())
    monkeypatch.setattr(cli, "_available_bytes", lambda: 12 * n)
    with pytest.raises(cli.CommandError, match=r"its float32 weights, gradients and AdamW moments alone take "):
        cli.check_memory_fits(cfg, "cpu")
    cli.check_memory_fits(dataclasses.replace(cfg, dtype="bfloat16"), "cpu")  # 8 n bytes fit in 12 n
    cli.check_memory_fits(cfg, "cuda")  # (not checked on a GPU)


def test_time_estimate_counts_steps_evaluations_sweeps_and_processes():
    """The estimate printed before a run: each method's steps at its STEP_COST x the probed AdamW step, its
    evaluation batches (a third of a step each), a process start per run, and the sweeps' extra runs."""
    cfg = train.TrainConfig(steps=40, batch_size=4, seq_len=32, dim=32, n_layers=1).resolve()
    evals = math.ceil(min(cfg.eval_windows, train._longest_sequence() // 32) / 4)
    one = train.estimate_seconds(["adamw"], cfg, step_s=0.5)
    assert one == pytest.approx(train.PROCESS_START_S + 40 * 0.5 + evals * 0.5 / 3)
    both = train.estimate_seconds(["adamw", "qgalore"], cfg, step_s=0.5)
    assert both - one == pytest.approx(train.PROCESS_START_S + 40 * 0.5 * train.STEP_COST["qgalore"] + evals * 0.5 / 3)
    swept = train.estimate_seconds(["adamw"], cfg, step_s=0.5, sweep_rates={"adamw": None}, sweep_steps=10)
    assert swept - one == pytest.approx(train.PROCESS_START_S + 3 * (10 * 0.5 + evals * 0.5 / 3))
    assert set(train.STEP_COST) == set(train.METHODS)
    assert train.probe_step_seconds(cfg, steps=1) > 0
