"""weightkit.integrations.transformers end to end: a tiny LlamaForCausalLM (built from a LlamaConfig, random token
data, no network) trained by ``transformers.Trainer`` on the CPU with weightkit's optimizers; Trainer checkpoints
resumed bit-identically; optimizer state loadable with ``weights_only=True``; swapped layers through
save_pretrained / load_pretrained."""

import json
import os
import re
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import weightkit  # noqa: E402
from weightkit.integrations.transformers import (LayerwiseTrainerOptimizer, load_pretrained,  # noqa: E402
                                                 low_rank_targets, make_optimizer, record_layers, save_pretrained)
from weightkit.nn import DictLinear, Int8Linear, MemoryLinear  # noqa: E402

VOCAB, SEQ = 128, 32
SWAP_OPTS = {"int8": {"group_size": 32}, "memoryformer": {"tau": 8}, "dictionary": {"ratio": 0.3, "iters": 1}}
SWAP_CLASSES = {"int8": Int8Linear, "memoryformer": MemoryLinear, "dictionary": DictLinear}


def tiny_llama(swap=None, seed=0, **config):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                   attention_dropout=0.0, **config)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if swap is not None:
        report = weightkit.swap(model, swap, **SWAP_OPTS[swap])
        assert len(report.replaced) == 14, report  # 7 linear layers per block, lm_head kept
    return model


class TokenData(torch.utils.data.Dataset):
    """Random start tokens continued by t -> (3 t + 1) mod VOCAB: learnable, so the loss must fall."""

    def __init__(self, n=48):
        gen = torch.Generator().manual_seed(1)
        tokens = [torch.randint(0, VOCAB, (n, 1), generator=gen)]
        for _ in range(SEQ - 1):
            tokens.append((tokens[-1] * 3 + 1) % VOCAB)
        self.tokens = torch.cat(tokens, 1)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def training_args(out, max_steps=12, **kw):
    opts = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, per_device_train_batch_size=8,
                learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_steps=6,
                seed=0, data_seed=0, max_grad_norm=0.0, disable_tqdm=True, dataloader_num_workers=0,
                save_only_model=False)
    opts.update(kw)
    return transformers.TrainingArguments(**opts)


# (swap, method, layerwise, extra TrainingArguments)
CASES = {
    "galore": (None, "galore", False, {"max_grad_norm": 1.0}),
    "galore8bit": (None, "galore8bit", False, {}),
    "qgalore-int8": ("int8", "qgalore", False, {"max_grad_norm": 1.0}),  # Trainer's default clipping
    "qgalore-int8-layerwise": ("int8", "qgalore", True, {}),
    "layerwise": (None, "galore", True, {}),
    "layerwise-accumulate2": (None, "galore", True, {"gradient_accumulation_steps": 2}),
}


def train(case, out, max_steps=12, resume=None, **kw):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    swap, method, layerwise, extra = CASES[case]
    model = tiny_llama(swap)
    args = training_args(out, max_steps=max_steps, **{**extra, **kw})
    eight_bit = {"min_8bit_size": 1024} if method != "galore" else {}  # this tiny model's moments in 8 bits too
    opt = make_optimizer(model, method, rank=8, update_proj_gap=4, args=args, layerwise=layerwise, **eight_bit)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, opt, losses


def param_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainer_trains_and_resumes_bit_identically(case, tmp_path):
    model, opt, losses = train(case, tmp_path / "full")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    full = param_snapshot(model)
    if CASES[case][0] == "int8":  # the int8 weights themselves were trained (stochastic rounding writes)
        init = tiny_llama("int8").state_dict()
        w = "model.layers.0.mlp.up_proj.weight"
        assert full[w].dtype == torch.int8 and not torch.equal(full[w], init[w])

    checkpoint = tmp_path / "full" / "checkpoint-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # tensors and numbers only
    states = [s for sd in saved["optimizers"] for s in sd["state"].values()] if CASES[case][2] \
        else list(saved["state"].values())
    bases = [s for s in states if "ortho" in s or "ortho_q" in s]
    assert bases and all(isinstance(s.get("ortho", s.get("ortho_q")), torch.Tensor) for s in bases)
    assert all(s["step"] == 6 for s in bases), [s["step"] for s in bases]

    resumed, _, resumed_losses = train(case, tmp_path / "resumed", resume=str(checkpoint))
    assert resumed_losses == losses  # the first six come from the checkpoint's trainer_state.json
    after = param_snapshot(resumed)
    assert after.keys() == full.keys()
    for k in full:
        assert torch.equal(after[k], full[k]), k


def test_trainer_checkpoint_of_swapped_model_loads_with_load_pretrained(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_llama("int8")
    record_layers(model)  # so Trainer's save_pretrained writes the layer record into each checkpoint's config
    args = training_args(tmp_path, max_steps=3, save_steps=3)
    opt = make_optimizer(model, "qgalore", rank=8, args=args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    trainer.train()
    loaded = load_pretrained(str(tmp_path / "checkpoint-3"))
    tokens = TokenData().tokens[:4]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model.eval()(tokens).logits)


@pytest.mark.parametrize("method,tied", [(m, False) for m in sorted(SWAP_OPTS)] + [("int8", True)])
def test_swapped_layers_round_trip_save_load_pretrained(method, tied, tmp_path):
    model = tiny_llama(method, tie_word_embeddings=tied).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    save_pretrained(model, str(tmp_path))
    assert (tmp_path / "model.safetensors").is_file()
    with open(tmp_path / "config.json") as f:
        record = json.load(f)["weightkit_layers"]
    assert record["model.layers.1.self_attn.q_proj"]["class"] == SWAP_CLASSES[method].__name__
    loaded = load_pretrained(str(tmp_path))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for name, module in model.named_modules():
        assert type(loaded.get_submodule(name)) is type(module), name
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    tokens = TokenData().tokens[:4]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_bfloat16_model_round_trips_in_its_dtype(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    weightkit.swap(model, "int8", group_size=32)
    save_pretrained(model.eval(), str(tmp_path))
    loaded = load_pretrained(str(tmp_path))
    before, after = model.state_dict(), loaded.state_dict()
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    tokens = TokenData().tokens[:2]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_trainer_clipping_counts_and_clips_int8_gradients(tmp_path):
    """Trainer's max_grad_norm clips with torch.nn.utils.clip_grad_norm_, which now sees the Int8Linear weights'
    .grad: at the optimizer step the norm of every gradient, int8 ones included, is max_grad_norm."""
    pytest.importorskip("accelerate")
    model = tiny_llama("int8")
    args = training_args(tmp_path, max_steps=2, save_steps=100, max_grad_norm=1e-3)
    opt = make_optimizer(model, "qgalore", rank=8, args=args)
    int8 = [m.weight for m in model.modules() if isinstance(m, Int8Linear)]
    seen = []

    def record(optimizer, _args, _kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))),
                     float(torch.linalg.vector_norm(torch.stack([w.grad.norm() for w in int8])))))

    opt.register_step_pre_hook(record)
    transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None)).train()
    assert len(seen) == 2
    for total, int8_part in seen:
        assert total == pytest.approx(1e-3, rel=1e-3) and 0.1 * total < int8_part <= total


def test_skipped_qgalore_step_then_trainers_zero_grad_clears_int8_gradients():
    """Trainer clears gradients with model.zero_grad(): the int8 weights' gradients are ordinary .grad tensors, so
    that clears them too, and a skipped step's NaN gradient does not poison the next (no optimizer hook needed)."""
    model = tiny_llama("int8")
    opt = make_optimizer(model, "qgalore", rank=8, nonfinite="skip")
    assert not opt._optimizer_step_post_hooks  # no weightkit-specific hook
    tokens = TokenData().tokens[:2]
    model(tokens, labels=tokens).loss.backward()
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.grad[0, 0] = float("nan")
    before = weight.qdata.clone()
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(weight.qdata, before)
    model.zero_grad()
    assert all(m.weight.grad is None for m in model.modules() if isinstance(m, Int8Linear))
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(weight.qdata, before)


def test_plain_from_pretrained_cannot_rebuild_swapped_layers(tmp_path):
    """Why load_pretrained exists: from_pretrained builds nn.Linear layers from the config and loads the int8 codes
    into them as if they were float weights (the scales are dropped as unexpected keys): a wrong model, silently."""
    model = tiny_llama("int8").eval()
    save_pretrained(model, str(tmp_path))
    plain = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    swapped = model.get_submodule("model.layers.0.self_attn.q_proj")
    loaded = plain.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(loaded) is nn.Linear
    assert torch.equal(loaded.weight, swapped.weight.qdata.float())  # the codes, not code x scale
    assert float(loaded.weight.detach().abs().max()) == 127.0
    tokens = TokenData().tokens[:1]
    with torch.no_grad():
        assert not torch.allclose(plain(tokens).logits, model(tokens).logits, atol=1e-2)
    rebuilt = load_pretrained(str(tmp_path))  # what load_pretrained gives instead
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens).logits, model(tokens).logits)


def test_transformers_builtin_galore_misses_swapped_layers(tmp_path):
    """The two problems make_optimizer solves, as transformers 5 and galore-torch 1.0 show them: Trainer's own GaLore
    (optim='galore_adamw') keeps only nn.Linear targets, so a swapped Int8Linear lands in the plain AdamW group
    (trained densely, with full-size float32 moments, not low-rank), and its checkpoints hold pickled projector objects
    that torch.load(weights_only=True), as Trainer resumes, refuses."""
    pytest.importorskip("accelerate")
    pytest.importorskip("galore_torch")
    model = tiny_llama()
    weightkit.swap(model, "int8", filter_fn=lambda name, _m: "mlp" in name, group_size=32)
    args = training_args(tmp_path, max_steps=2, save_steps=2, optim="galore_adamw",
                         optim_target_modules=["q_proj", "up_proj"], optim_args="rank=8, update_proj_gap=1")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    opt = trainer.create_optimizer()
    up = model.model.layers[0].mlp.up_proj.weight
    assert [("rank" in g) for g in opt.param_groups if any(p is up for p in g["params"])] == [False]
    before = up.qdata.clone()
    trainer.train()
    assert not torch.equal(up.qdata, before)  # trained, by stochastic rounding of the dense AdamW update
    with pytest.raises(Exception, match="[Ww]eights.only"):
        torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)


def test_load_pretrained_without_record_raises_or_takes_layers(tmp_path):
    model = tiny_llama("int8").eval()
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="weightkit_layers"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="directory"):
        load_pretrained(str(tmp_path / "missing"))
    layers = record_layers(tiny_llama("int8"))  # the record of a model swapped the same way
    loaded = load_pretrained(str(tmp_path), layers=layers)
    tokens = TokenData().tokens[:2]
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    with pytest.raises(ValueError, match="do not fit"):  # int8 weights would be cast into nn.Linear layers
        load_pretrained(str(tmp_path), layers={})
    with pytest.raises(ValueError, match="not a module"):
        load_pretrained(str(tmp_path), layers={"model.no_such.layer": layers["model.layers.0.mlp.up_proj"]})


def test_targets_by_type_and_name():
    model = tiny_llama()
    weightkit.swap(model, "int8", filter_fn=lambda name, _m: "mlp" in name, group_size=32)
    targets = dict(low_rank_targets(model, ["q_proj", "up_proj"]))
    assert sorted(targets) == [f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp.up_proj", "self_attn.q_proj")]
    assert all(isinstance(targets[f"model.layers.{i}.mlp.up_proj"], Int8Linear) for i in range(2))
    assert "lm_head" not in dict(low_rank_targets(model, "all-linear"))
    assert sorted(dict(low_rank_targets(model, r".*\.self_attn\.[qk]_proj"))) == \
        sorted(f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in "qk")

    int8_weights = [m.weight for m in model.modules() if isinstance(m, Int8Linear)]
    with pytest.raises(ValueError, match="not in target_modules"):  # "mlp" names a block, not a linear layer
        make_optimizer(model, "qgalore", rank=8, target_modules=["q_proj", "mlp"])
    opt = make_optimizer(model, "qgalore", rank=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups})  # each parameter once
    trained = [p for p in model.parameters() if p.requires_grad] + int8_weights
    assert {id(p) for p in in_groups} == {id(p) for p in trained}
    assert opt.param_groups[0]["rank"] == 8 and len(opt.param_groups[0]["params"]) == 2 + len(int8_weights)
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in int8_weights)


def test_weight_decay_groups_follow_trainer():
    model = tiny_llama()
    opt = make_optimizer(model, "galore", rank=8, weight_decay=0.1)
    low, matrices, vectors = opt.param_groups
    assert low["weight_decay"] == 0.1 and matrices["weight_decay"] == 0.1 and vectors["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in matrices["params"]) and all(p.dim() == 1 for p in vectors["params"])


def test_bad_arguments_raise_naming_them():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method"):
        make_optimizer(model, "adamw")
    with pytest.raises(ValueError, match="target_modules"):
        make_optimizer(model, "galore", target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="target_modules"):
        make_optimizer(model, "galore", target_modules=[])
    with pytest.raises(ValueError, match="target_modules"):
        make_optimizer(model, "galore", target_modules="(unclosed")
    with pytest.raises(ValueError, match="rank"):
        make_optimizer(model, "galore", rank=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        make_optimizer(model, "galore", accumulation_steps=2)
    with pytest.raises(TypeError, match="model"):
        make_optimizer("model", "galore")
    swapped = tiny_llama("int8")  # every method trains int8 weights (their gradient is an ordinary .grad)
    int8 = {id(m.weight) for m in swapped.modules() if isinstance(m, Int8Linear)}
    for method in ("galore", "qgalore"):
        opt = make_optimizer(swapped, method, rank=8)
        assert int8 <= {id(p) for p in opt.param_groups[0]["params"]}
    assert len(make_optimizer(swapped, "qgalore", rank=8, layerwise=True).param_groups) >= len(int8)
    with pytest.warns(UserWarning, match="cannot project"):
        make_optimizer(tiny_llama("memoryformer"), "galore", rank=8, target_modules=["q_proj", "lm_head"])


def test_layerwise_checks_trainer_settings(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_optimizer(model, "galore", rank=8, layerwise=True, args=training_args(tmp_path, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_optimizer(model, "galore", rank=8, layerwise=True, accumulation_steps=1,
                       args=training_args(tmp_path, gradient_accumulation_steps=2))
    with warnings.catch_warnings():  # Trainer's clipping reaches int8 gradients: nothing to warn about
        warnings.simplefilter("error")
        make_optimizer(tiny_llama("int8"), "qgalore", rank=8, args=training_args(tmp_path, max_grad_norm=1.0))
    # an optimizer built without the args, then given to a Trainer that accumulates: refused at the first step
    opt = make_optimizer(model, "galore", rank=8, layerwise=True)
    assert isinstance(opt, LayerwiseTrainerOptimizer)
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps"):
        trainer.train()


def test_readme_example_runs(tmp_path, monkeypatch):
    """The Trainer example of docs/transformers.md (linked from the README), run as written (in a temporary
    directory)."""
    pytest.importorskip("accelerate")
    page = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "transformers.md")
    if not os.path.isfile(page):
        pytest.skip("no docs/ beside the tests (installed package)")
    with open(page) as f:
        section = f.read()
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "docs/transformers.md", "exec"), namespace)  # noqa: S102 - the docs' own example
    losses = [h["loss"] for h in namespace["trainer"].state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < 0.1 * losses[0], losses
    assert (tmp_path / "hf-out" / "checkpoint-20" / "optimizer.pt").is_file()
    assert isinstance(namespace["again"].model.layers[0].self_attn.q_proj, Int8Linear)


def test_load_pretrained_describes_a_damaged_file(tmp_path):
    """A truncated or corrupt model.safetensors raises CheckpointError saying what is wrong with the file, not
    safetensors' raw SafetensorError."""
    from weightkit.checkpoint import CheckpointError

    model = tiny_llama("int8").eval()
    save_pretrained(model, str(tmp_path))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors' is truncated: its header describes \d+ bytes"):
        load_pretrained(str(tmp_path))
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="fewer than the 8 that give the header's length"):
        load_pretrained(str(tmp_path))
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"#" * header_len + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="its header .* is not valid safetensors JSON") as err:
        load_pretrained(str(tmp_path))
    assert "SafetensorError" not in str(err.value)
