"""Checkpoints: exact round trip; truncated, corrupted or mismatched files raise and change nothing."""

import os

import pytest
import torch

from weightkit.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from weightkit.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)


def trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = TinyLlama(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 16))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_gives_identical_next_step(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt, extra={"step": 3})
    model2, opt2 = trained(seed=1)
    extra = load_checkpoint(path, model2, opt2)
    assert extra == {"step": 3}
    tokens = torch.randint(0, 256, (2, 16))
    for m, o in ((model, opt), (model2, opt2)):
        m(tokens[:, :-1], tokens[:, 1:]).backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_file_raises_and_changes_nothing(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    other, other_opt = trained(seed=1)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, other, other_opt)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_flipped_byte_fails_checksum(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt)
    data = bytearray(open(path, "rb").read())
    # flip a byte inside the stored body (the largest stored record), not in the zip directory
    pos = len(data) // 2
    data[pos] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256|truncated or corrupt"):
        read_checkpoint(path)


def test_mismatched_model_raises_and_changes_nothing(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt)
    bigger = TinyLlama(LlamaConfig(dim=48, n_layers=1, n_heads=2, hidden_dim=64))
    before = snapshot(bigger)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path, bigger)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    deeper = TinyLlama(LlamaConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path, deeper)


def test_optimizer_mismatch_restores_model(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt)
    other, _ = trained(seed=1)
    wrong_opt = torch.optim.AdamW(list(other.parameters())[:3], lr=1e-2)  # a different number of parameters
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="left as they were"):
        load_checkpoint(path, other, wrong_opt)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a weightkit checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.pt"))


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt, extra={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, extra={"step": 2})
    monkeypatch.undo()
    assert read_checkpoint(path)["extra"] == {"step": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
