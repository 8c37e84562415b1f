"""Checkpoints: exact round trip; truncated, corrupted or mismatched files raise and change nothing; on every device
(CPU and, when present, CUDA: a checkpoint is read on the CPU and loads into a model and optimizer on any device)."""

import os

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from weightkit.models import LlamaConfig, TinyLlama

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)


def trained(seed=0, steps=3, device="cpu"):
    torch.manual_seed(seed)
    model = TinyLlama(CFG).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 16)).to(device)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_optimizer_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            w = sb[i][k]
            if isinstance(v, torch.Tensor):
                assert w.device == v.device and w.dtype == v.dtype and torch.equal(w, v), (i, k)
            else:
                assert w == v, (i, k)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_gives_identical_next_step(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt, extra={"step": 3})
    model2, opt2 = trained(seed=1, device=device)
    extra = load_checkpoint(path, model2, opt2)
    assert extra == {"step": 3}
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):  # loaded exactly, in place
        assert b.device == a.device and torch.equal(a, b), k
    assert_same_optimizer_state(opt, opt2)
    tokens = torch.randint(0, 256, (2, 16)).to(device)
    for m, o in ((model, opt), (model2, opt2)):
        m(tokens[:, :-1], tokens[:, 1:]).backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        if device == "cpu":
            assert torch.equal(a, b), k
        else:  # CUDA attention backward accumulates in a run-dependent order: equal up to rounding
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_loads_across_devices(tmp_path, device):
    """Written from one device, loaded into a model and optimizer on another (CPU <-> CUDA when there is a GPU)."""
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    other = "cpu" if device != "cpu" else DEVICES[-1]
    model2, opt2 = trained(seed=1, device=other)
    load_checkpoint(path, model2, opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert b.device.type == other and torch.equal(a.cpu(), b.cpu()), k
    for st in opt2.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert v.device.type == other, k


@pytest.mark.parametrize("device", DEVICES)
def test_galore_and_int8_state_round_trip(tmp_path, device):
    """Q-GaLore on Int8Linear layers: int8 weights, scales, the INT4 projector and the moments round-trip through a
    checkpoint file (read on the CPU) onto the device, and the next steps (stochastic rounding included) agree."""
    pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    import weightkit
    from weightkit.optim import QGaLoreAdamW8bit, param_groups

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
        weightkit.swap(model, "int8", filter_fn=lambda n, m: True, group_size=32)
        return model, QGaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=2), lr=1e-2)

    def step(model, opt, x, y):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 64, generator=g).to(device), torch.randn(16, 32, generator=g).to(device)
    model, opt = build()
    for _ in range(3):
        step(model, opt, x, y)
    path = str(tmp_path / "ck.pt")
    save_checkpoint(path, model, opt)
    model2, opt2 = build()
    load_checkpoint(path, model2, opt2)
    assert_same_optimizer_state(opt, opt2)
    for _ in range(3):  # crosses the refresh at step 4
        step(model, opt, x, y)
        step(model2, opt2, x, y)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("device", DEVICES)
def test_restore_rng(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    after_save = torch.randn(5, device=device)
    torch.randn(7, device=device)  # the generators move on
    load_checkpoint(path, model, opt, restore_rng=True)
    assert torch.equal(torch.randn(5, device=device), after_save)


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_file_raises_and_changes_nothing(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    other, other_opt = trained(seed=1, device=device)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=r"is truncated: the end of the file .* is missing") as err:
        load_checkpoint(path, other, other_opt)
    assert "Error" not in str(err.value)  # words, not an internal exception
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("device", DEVICES)
def test_flipped_byte_fails_checksum(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    data = bytearray(open(path, "rb").read())
    # flip a byte inside the stored body (the largest stored record), not in the zip directory
    pos = len(data) // 2
    data[pos] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256|is corrupt: bytes inside it changed"):
        read_checkpoint(path)


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_model_raises_and_changes_nothing(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    bigger = TinyLlama(LlamaConfig(dim=48, n_layers=1, n_heads=2, hidden_dim=64)).to(device)
    before = snapshot(bigger)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(path, bigger)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    deeper = TinyLlama(LlamaConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64)).to(device)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path, deeper)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_mismatch_restores_model(tmp_path, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt)
    other, _ = trained(seed=1, device=device)
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


@pytest.mark.parametrize("device", DEVICES)
def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch, device):
    path = str(tmp_path / "ck.pt")
    model, opt = trained(device=device)
    save_checkpoint(path, model, opt, extra={"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, extra={"step": 2})
    monkeypatch.undo()
    assert read_checkpoint(path)["extra"] == {"step": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


@pytest.mark.parametrize("content, reason", [
    (b"", r"is empty \(0 bytes\)"),
    (b"step 100, loss 2.31\n" * 8,
     r"is not a checkpoint: its 160 bytes do not start like a file written by torch.save"),
    (bytes(range(256)) * 4, r"is not a checkpoint"),
    (b"\xff\xfe\x00 not text" * 10, r"is not a checkpoint"),
])
def test_damaged_files_are_described_in_words(tmp_path, content, reason):
    """Files torch.load refuses with an internal exception (OSError: [Errno 22], UnicodeDecodeError, KeyError: 101)
    get a reason in words, not the exception."""
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        read_checkpoint(str(path))
    for internal in ("Errno", "UnicodeDecodeError", "KeyError", "UnpicklingError"):
        assert internal not in str(err.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(str(tmp_path))


def test_changed_byte_of_the_archive_directory_is_described(tmp_path):
    path = str(tmp_path / "ck.pt")
    model, opt = trained()
    save_checkpoint(path, model, opt)
    data = bytearray(open(path, "rb").read())
    data[-30:] = bytes(30)  # the zip's end-of-directory record
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="is truncated|is corrupt") as err:
        read_checkpoint(path)
    assert "Error" not in str(err.value)
