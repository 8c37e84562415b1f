"""The main job (weightkit train): every method learns on real text; measurements are real."""

import math
import os
import subprocess
import sys

import pytest
import torch

from weightkit import train
from weightkit.data import byte_corpus
from weightkit.models.llama import unigram_entropy_bits

TINY = dict(steps=60, batch_size=8, seq_len=64, lr=3e-3, rank=16, update_proj_gap=20, dim=64, n_layers=2, n_heads=4,
            eval_every=10)


def test_corpus_is_real_text():
    tr, va = byte_corpus()
    assert len(tr) > 300_000 and len(va) > 10_000
    text = bytes(tr[:2000].to(torch.uint8).tolist()).decode("utf-8", errors="replace")
    assert " the " in text


@pytest.mark.parametrize("method", train.METHODS)
def test_method_learns(method):
    cfg = train.TrainConfig(**TINY)
    result = train.run(method, cfg, progress=False)
    unigram_nats = unigram_entropy_bits(byte_corpus()[0]) * math.log(2)
    assert result.train_loss[0] < math.log(256) + 0.5
    assert result.val_loss < unigram_nats, f"{method}: val loss {result.val_loss:.3f} not below unigram {unigram_nats:.3f}"
    assert result.optimizer_state_bytes > 0 and result.tokens_per_s > 0 and result.peak_rss_mb > 0


def test_low_rank_state_is_smaller_than_adamw():
    cfg = train.TrainConfig(**dict(TINY, steps=2, eval_every=1))
    states = {m: train.run(m, cfg, progress=False).optimizer_state_bytes for m in ("adamw", "galore")}
    assert states["galore"] < states["adamw"]


def test_tensor_bytes_counts_each_tensor_once():
    a = torch.zeros(10)
    state = {"x": {"m": a, "v": a.view(10)}, "y": [torch.zeros(3, dtype=torch.float16)]}
    assert train.tensor_bytes(state) == 40 + 6


def test_cli_train_writes_json_and_plot(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "weightkit", "train", "--methods", "adamw", "--steps", "4",
                           "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--layers", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| adamw |" in proc.stdout
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
    bad = subprocess.run([sys.executable, "-m", "weightkit", "train", "--methods", "sgd"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown method 'sgd'" in bad.stderr
