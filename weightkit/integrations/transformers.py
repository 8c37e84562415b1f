"""Hugging Face ``transformers``: train with weightkit's optimizers and swapped layers under ``Trainer``, and save
and load models whose layers were swapped.

Optimizers. ``transformers.Trainer`` has GaLore built in (``optim="galore_adamw"``, ``optim_target_modules``), but
its low-rank setup keeps only modules that are ``nn.Linear`` (an isinstance check): the layers that
``weightkit.swap`` puts in (Int8Linear, MemoryLinear, DictLinear) are not, so they silently get plain AdamW there.
It also runs galore-torch, whose optimizer state holds pickled projector objects (a checkpoint then fails
``torch.load(weights_only=True)``, which is how Trainer resumes). Build the optimizer here instead and hand it
over::

    opt = make_optimizer(model, "qgalore", rank=16, target_modules=["q_proj", "v_proj", "up_proj"], args=args)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

``Trainer`` then builds its learning-rate schedule from ``args`` around this optimizer, saves its state dict in each
checkpoint (plain tensors and numbers: the projection bases, INT4 for Q-GaLore, are tensors) and restores it on
``trainer.train(resume_from_checkpoint=...)``; with the data order, RNG states and schedule that Trainer restores
itself, a resumed run continues bit-identically (tests/integrations/test_transformers.py).

Targets are chosen by module type *and* name: the 2-D weights of ``nn.Linear`` and ``weightkit.nn.Int8Linear``
layers whose names match ``target_modules`` get GaLore; every other trainable parameter (embeddings, norms,
biases, the head, MemoryLinear tables, DictLinear factors) goes to a dense AdamW group of the same optimizer.

Layer-wise GaLore (``layerwise=True``) updates each parameter inside backward (weightkit.optim.LayerwiseGaLore);
``make_optimizer`` then returns a :class:`LayerwiseTrainerOptimizer`, whose ``step()`` only checks that every
parameter was updated once since the last one, and whose param groups are the per-parameter optimizers' groups, so Trainer's schedule sets their learning rates and its
checkpoints hold their states. Gradient clipping cannot work there (each gradient is used and freed in backward,
before Trainer clips), so it needs ``max_grad_norm=0``, and Trainer's ``gradient_accumulation_steps`` must equal
the optimizer's ``accumulation_steps``; both are checked.

Saving. ``model.save_pretrained`` writes the swapped layers' tensors (int8 weights and scales, lookup tables,
dictionaries and codes), but ``from_pretrained`` builds the architecture from its config, with nn.Linear layers,
and cannot put them back. :func:`record_layers` writes what each swapped layer is (class and sizes) into
``model.config.weightkit_layers``, so every later ``save_pretrained`` (Trainer's checkpoints included) carries it in
``config.json``; :func:`load_pretrained` builds the model from the config, swaps the recorded layers in, and loads
the saved tensors exactly. :func:`save_pretrained` is ``record_layers`` then ``model.save_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.dictionary import DictLinear
from ..nn.int8 import Int8Linear
from ..nn.memoryformer import MemoryLinear
from ..nn.walk import skipped_by_default
from ..optim import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore, QGaLoreAdamW8bit, param_groups

OPTIMIZERS = {"galore": GaLoreAdamW, "galore8bit": GaLoreAdamW8bit, "qgalore": QGaLoreAdamW8bit}
CONFIG_KEY = "weightkit_layers"

Targets = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


# -- choosing what GaLore projects --------------------------------------------------------------------------------
def _target_matcher(target_modules: Targets) -> Callable[[str, nn.Module], bool]:
    """``match(name, module)`` for "all-linear", a regex string (full match of the module name), a list of names
    (a module matches a name when its own name equals it or ends in "." + it, as peft does) or a callable. Only
    nn.Linear and Int8Linear layers are asked (``weightkit.optim.param_groups``)."""
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        if target_modules.replace("_", "-") == "all-linear":
            # all but the output heads (weightkit.nn.walk.DEFAULT_SKIP: the rule of swap, compress, param_groups)
            return lambda name, _module: not skipped_by_default(name)
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not 'all-linear' nor a valid regex: {exc}") from exc
        return lambda name, _module: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set)) and target_modules and \
            all(isinstance(t, str) and t for t in target_modules):
        names = tuple(target_modules)
        return lambda name, _module: any(name == t or name.endswith("." + t) for t in names)
    raise ValueError("target_modules must be 'all-linear', a regex string, a non-empty list of module names or a "
                     f"callable(name, module) -> bool, got {target_modules!r}")


def _warn_unprojectable(model: nn.Module, target_modules: Targets, match) -> None:
    """Warn about MemoryLinear / DictLinear layers that an explicit ``target_modules`` names: GaLore cannot project
    them (3-D tables, factored weights), so they train with dense AdamW."""
    if isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear":
        return
    ignored = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
               if isinstance(m, (MemoryLinear, DictLinear)) and match(name, m)]
    if ignored:
        warnings.warn(f"target_modules matched {len(ignored)} module(s) that GaLore cannot project, trained with "
                      f"dense AdamW instead: {', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''}",
                      stacklevel=3)


def low_rank_targets(model: nn.Module, target_modules: Targets = "all-linear") -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs whose ``weight`` GaLore projects: the layers that ``weightkit.optim.param_groups``
    can put in a GaLore group (nn.Linear and Int8Linear with a trainable 2-D weight) and ``target_modules``
    matches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    groups = param_groups(model, filter_fn=_target_matcher(target_modules))
    chosen = {id(p) for p in groups[0]["params"]} if groups and "rank" in groups[0] else set()
    return [(name, m) for name, m in model.named_modules() if id(getattr(m, "weight", None)) in chosen]


def _trained_int8_weights(model: nn.Module) -> Dict[int, str]:
    """id -> name of the trainable Int8Linear weights (``requires_grad``)."""
    return {id(m.weight): f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, Int8Linear) and m.weight.requires_grad}


def optimizer_param_groups(model: nn.Module, target_modules: Targets = "all-linear", *, rank: int = 128,
                           update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                           weight_decay: float = 0.0) -> List[Dict]:
    """Param groups for weightkit's GaLore optimizers: ``weightkit.optim.param_groups`` with ``target_modules`` as
    its filter (the GaLore group: the weights of :func:`low_rank_targets`, with ``rank, update_proj_gap, scale,
    proj_type``), its dense group split as Trainer does into matrices (with ``weight_decay``) and vectors (biases,
    norms: no decay). Every trainable parameter appears once; empty groups are left out. Raises when nothing is
    selected, and when a trained Int8Linear weight is left out (it can train only in the GaLore group)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    match = _target_matcher(target_modules)
    _warn_unprojectable(model, target_modules, match)
    groups = param_groups(model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                          filter_fn=match, weight_decay=weight_decay)
    if not groups or "rank" not in groups[0]:
        raise ValueError(f"target_modules={target_modules!r} selects no nn.Linear or Int8Linear layer of the model "
                         "(names are matched against model.named_modules())")
    low_rank = {id(p) for p in groups[0]["params"]}
    untargeted_int8 = [name for key, name in _trained_int8_weights(model).items() if key not in low_rank]
    if untargeted_int8:
        raise ValueError(f"Int8Linear weights {untargeted_int8[:4]}{' ...' if len(untargeted_int8) > 4 else ''} are "
                         "not in target_modules: weightkit's optimizers train int8 weights through the low-rank "
                         "update only; add them to target_modules, or freeze them with track_weight_grad=False")
    rest = groups[1]["params"] if len(groups) > 1 else []
    matrices, vectors = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
    return groups[:1] + [g for g in ({"params": matrices, "weight_decay": weight_decay},
                                     {"params": vectors, "weight_decay": 0.0}) if g["params"]]


# -- the optimizer for Trainer ------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, method: str = "galore", *, rank: int = 128, target_modules: Targets = "all-linear",
                   lr: Optional[float] = None, weight_decay: Optional[float] = None, betas=None,
                   eps: Optional[float] = None, update_proj_gap: int = 200, scale: float = 0.25,
                   proj_type: str = "std", layerwise: bool = False, accumulation_steps: Optional[int] = None,
                   args=None, **optimizer_kwargs):
    """A weightkit GaLore optimizer for ``model``, to pass as ``Trainer(optimizers=(opt, None))``.

    Args:
        model: the model (a transformers PreTrainedModel or any nn.Module), after ``weightkit.swap`` if any.
        method: ``'galore'`` (GaLoreAdamW), ``'galore8bit'`` (GaLoreAdamW8bit: 8-bit moments) or ``'qgalore'``
            (QGaLoreAdamW8bit: INT4 projection bases, 8-bit moments, lazy refresh). Each trains Int8Linear weights
            (fused low-rank update written back by stochastic rounding).
        rank, update_proj_gap, scale, proj_type: GaLore settings of the low-rank group.
        target_modules: ``'all-linear'`` (every nn.Linear / Int8Linear but ``lm_head``), a regex fully matching
            module names, a list of names (``["q_proj", "v_proj"]`` matches ``...self_attn.q_proj``) or a callable
            ``(name, module) -> bool``. See :func:`low_rank_targets`.
        lr, weight_decay, betas, eps: AdamW settings; ``None`` takes them from ``args`` (learning_rate,
            weight_decay, adam_beta1/2, adam_epsilon) when given, else the optimizer's defaults (lr 1e-3,
            no decay, (0.9, 0.999), 1e-6).
        layerwise: update each parameter inside backward (LayerwiseGaLore); returns a
            :class:`LayerwiseTrainerOptimizer`. ``accumulation_steps`` defaults to ``args.gradient_accumulation_steps``
            (or 1).
        args: the ``TrainingArguments`` the Trainer will get: defaults as above, and checks of settings that cannot
            work (layer-wise with clipping or a different accumulation). Int8Linear weights' gradients are ordinary
            ``.grad`` tensors: Trainer's clipping (``max_grad_norm``) counts and clips them.
        **optimizer_kwargs: passed to the optimizer (``svd='randomized'``, ``proj_dtype='bfloat16'``, ``seed``,
            ``nonfinite``, ``min_8bit_size``, Q-GaLore's ``cos_threshold, gamma_proj, queue_size,
            proj_group_size``).
    """
    if method not in OPTIMIZERS:
        raise ValueError(f"method={method!r} is not one of {', '.join(OPTIMIZERS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if args is not None:
        lr = args.learning_rate if lr is None else lr
        weight_decay = args.weight_decay if weight_decay is None else weight_decay
        betas = (args.adam_beta1, args.adam_beta2) if betas is None else betas
        eps = args.adam_epsilon if eps is None else eps
    adam = {k: v for k, v in (("lr", lr), ("betas", betas), ("eps", eps)) if v is not None}
    groups = optimizer_param_groups(model, target_modules, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                    proj_type=proj_type, weight_decay=weight_decay or 0.0)
    max_grad_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
    if layerwise:
        if max_grad_norm > 0:
            raise ValueError(f"layerwise=True needs TrainingArguments(max_grad_norm=0), got {max_grad_norm}: each "
                             "gradient is applied and freed inside backward, before Trainer would clip it")
        trainer_accumulation = getattr(args, "gradient_accumulation_steps", None)
        if accumulation_steps is None:
            accumulation_steps = trainer_accumulation or 1
        elif trainer_accumulation is not None and trainer_accumulation != accumulation_steps:
            raise ValueError(f"accumulation_steps={accumulation_steps} differs from the Trainer's "
                             f"gradient_accumulation_steps={trainer_accumulation}")
        inner = LayerwiseGaLore(groups, optimizer_cls=OPTIMIZERS[method], accumulation_steps=accumulation_steps,
                                **adam, **optimizer_kwargs)
        return LayerwiseTrainerOptimizer(inner)
    if accumulation_steps is not None:
        raise ValueError("accumulation_steps is for layerwise=True; Trainer accumulates gradients itself "
                         "(TrainingArguments.gradient_accumulation_steps)")
    return OPTIMIZERS[method](groups, **adam, **optimizer_kwargs)


class LayerwiseTrainerOptimizer(torch.optim.Optimizer):
    """What ``Trainer`` sees of a :class:`weightkit.optim.LayerwiseGaLore`: the updates happen inside backward
    (post-accumulate-grad hooks), so ``step()`` only checks that each parameter was updated once per Trainer step
    (a Trainer that accumulates more backward passes than ``accumulation_steps`` raises instead of training with
    the wrong batch). ``param_groups`` are the per-parameter optimizers' own groups, so Trainer's learning-rate
    schedule sets their ``lr``; ``state_dict()`` is the layer-wise optimizer's (every per-parameter state, tensors
    and numbers only), which Trainer saves in its checkpoints and restores on resume.

    Built by :func:`make_optimizer` with ``layerwise=True``. torch.optim.Optimizer's constructor is not run: there is
    no state of its own to hold."""

    def __init__(self, layerwise: LayerwiseGaLore):
        if not isinstance(layerwise, LayerwiseGaLore):
            raise TypeError(f"layerwise must be a weightkit.optim.LayerwiseGaLore, got {type(layerwise).__name__}")
        if not layerwise.hooks:
            raise ValueError("the LayerwiseGaLore must step from its own hooks (hooks=True) under Trainer")
        self.layerwise = layerwise
        self.defaults = {}
        self.state = {}
        # backward passes each parameter received since Trainer's last step, counted by hooks of our own
        self._passes = [0] * len(layerwise.params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._counter(i)) for i, p in enumerate(layerwise.params)]

    def _counter(self, index: int):
        def count(_p: Tensor) -> None:
            self._passes[index] += 1

        return count

    @property
    def param_groups(self) -> List[Dict]:
        # read anew each time: load_state_dict gives the per-parameter optimizers new group dicts
        return [g for opt in self.layerwise.optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        raise AttributeError("the param groups of a LayerwiseTrainerOptimizer are its per-parameter optimizers'")

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        most = max(self._passes, default=0)
        if self.layerwise.pending():
            raise RuntimeError(f"Trainer stepped after {most} backward passes, inside the layer-wise optimizer's "
                               f"accumulation window of {self.layerwise.accumulation_steps}: TrainingArguments."
                               "gradient_accumulation_steps must equal accumulation_steps, and the batches of an "
                               "epoch must fill whole windows (Trainer also steps at the end of each epoch)")
        if most > self.layerwise.accumulation_steps:
            raise RuntimeError(f"a parameter received {most} backward passes in one Trainer step, but the layer-wise "
                               f"optimizer updates every {self.layerwise.accumulation_steps}: set accumulation_steps "
                               "to TrainingArguments.gradient_accumulation_steps")
        self._passes = [0] * len(self._passes)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.layerwise.zero_grad(set_to_none)

    def state_dict(self) -> Dict:
        return self.layerwise.state_dict()

    def load_state_dict(self, state_dict: Dict) -> None:
        self.layerwise.load_state_dict(state_dict)
        self._passes = [0] * len(self._passes)

    def add_param_group(self, param_group: Dict) -> None:
        raise NotImplementedError("a LayerwiseTrainerOptimizer takes its parameters from its LayerwiseGaLore")

    def __repr__(self) -> str:
        return (f"LayerwiseTrainerOptimizer({len(self.layerwise.optimizers)} parameters, "
                f"{type(self.layerwise.optimizers[0]).__name__ if self.layerwise.optimizers else '-'}, "
                f"accumulation_steps={self.layerwise.accumulation_steps})")


# -- save_pretrained / from_pretrained of swapped layers ------------------------------------------------------------
def _layer_spec(module: nn.Module) -> Optional[Dict]:
    """What rebuilds ``module`` before its tensors are loaded (sizes and options; the tensors come from the file)."""
    if isinstance(module, Int8Linear):
        return {"class": "Int8Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "group_size": module.group_size,
                "track_weight_grad": bool(module.track_weight_grad)}
    if isinstance(module, MemoryLinear):
        return {"class": "MemoryLinear", "in_features": module.in_features, "out_features": module.out_features,
                "tau": module.tau, "t": module.t, "bias": module.bias is not None}
    if isinstance(module, DictLinear):
        return {"class": "DictLinear", "in_features": module.in_features, "out_features": module.out_features,
                "k": module.k, "s": module.s, "bias": module.bias is not None}
    return None


def record_layers(model: nn.Module) -> Dict[str, Dict]:
    """Write the swapped layers of ``model`` (name -> class and sizes) into ``model.config.weightkit_layers`` and
    return it. Call it after ``weightkit.swap``: every later ``model.save_pretrained`` (Trainer's checkpoints
    included) then stores it in config.json, and :func:`load_pretrained` can rebuild the model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with a .config), got {type(model).__name__}")
    layers, dictionaries = {}, {}
    for name, module in model.named_modules():
        spec = _layer_spec(module)
        if spec is None:
            continue
        if isinstance(module, DictLinear):
            other = dictionaries.setdefault(id(module.dictionary), name)
            if other != name:
                raise ValueError(f"DictLinear layers {other} and {name} share one dictionary; saving shared "
                                 "dictionaries through save_pretrained is not supported (each layer's would be "
                                 "stored and loaded separately)")
        layers[name] = spec
    config.weightkit_layers = layers
    return layers


def save_pretrained(model: nn.Module, save_directory: str, **kwargs) -> None:
    """:func:`record_layers`, then ``model.save_pretrained(save_directory, **kwargs)`` (safetensors by default).
    Load it back with :func:`load_pretrained`."""
    record_layers(model)
    model.save_pretrained(save_directory, **kwargs)


def _build_layer(spec: Dict, saved: Dict[str, Tensor], prefix: str, where: str) -> nn.Module:
    """An empty layer of ``spec``, in the dtype of its saved float tensors, ready for load_state_dict."""
    cls = spec.get("class")
    try:
        in_f, out_f, bias = int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"])
        if cls == "Int8Linear":
            dtype = saved[prefix + "bias"].dtype if bias else None
            return Int8Linear(in_f, out_f, bias, int(spec["group_size"]), dtype=dtype,
                              track_weight_grad=bool(spec.get("track_weight_grad", True)))
        if cls == "MemoryLinear":
            return MemoryLinear(in_f, out_f, int(spec["tau"]), float(spec["t"]), bias,
                                dtype=saved[prefix + "tables"].dtype)
        if cls == "DictLinear":
            return DictLinear(in_f, out_f, int(spec["k"]), int(spec["s"]), bias,
                              dtype=saved[prefix + "values"].dtype)
    except KeyError as exc:
        raise ValueError(f"{where}: layer {prefix[:-1]!r} ({cls}) lacks {exc} in its record or saved tensors") from exc
    raise ValueError(f"{where}: layer {prefix[:-1]!r} has unknown class {cls!r} in {CONFIG_KEY}")


def _read_state_dict(directory: str) -> Dict[str, Tensor]:
    """The tensors saved by ``save_pretrained`` in ``directory``: model.safetensors, its sharded index, or
    pytorch_model.bin (read with weights_only=True). A damaged file raises weightkit.checkpoint.CheckpointError
    saying what is wrong with it."""
    from ..checkpoint import CheckpointError, container_damage, safetensors_damage

    def read_safetensors(path: str) -> Dict[str, Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors: described from the file itself
            raise CheckpointError(f"{path!r} {safetensors_damage(path)}") from exc

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index!r} is corrupt: it is not the JSON index save_pretrained writes (an object "
                                  "whose weight_map maps tensor names to shard files)") from exc
        state: Dict[str, Tensor] = {}
        for name in files:
            state.update(read_safetensors(os.path.join(directory, name)))
        return state
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{binary!r} {container_damage(binary)}") from exc
    raise FileNotFoundError(f"{directory!r} holds no model.safetensors, model.safetensors.index.json or "
                            "pytorch_model.bin")


def load_pretrained(directory: str, model_cls=None, layers: Optional[Dict[str, Dict]] = None,
                    **config_kwargs) -> nn.Module:
    """The model saved in ``directory`` by :func:`save_pretrained` (or by ``model.save_pretrained`` / a Trainer
    checkpoint after :func:`record_layers`), with its weightkit layers, holding exactly the saved tensors.

    ``model_cls``: the transformers model class (default: the config's first ``architectures`` entry).
    ``layers``: the layer record to use instead of the config's (e.g. ``record_layers(model)`` of a model swapped
    the same way, for a checkpoint saved without one). ``config_kwargs`` override config entries, as in
    ``from_pretrained``. Local directories only; the model is built on the CPU in eval mode, as ``from_pretrained``
    returns it."""
    import transformers

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory={directory!r} is not a directory")
    config = transformers.AutoConfig.from_pretrained(directory, **config_kwargs)
    layers = getattr(config, CONFIG_KEY, None) if layers is None else layers
    if not isinstance(layers, dict):
        raise ValueError(f"{directory!r}: config.json has no {CONFIG_KEY!r} record; save with "
                         "weightkit.integrations.transformers.save_pretrained, call record_layers(model) before "
                         "model.save_pretrained / Trainer, or pass layers=")
    if model_cls is None:
        archs = getattr(config, "architectures", None) or []
        model_cls = getattr(transformers, archs[0], None) if archs else None
        if model_cls is None:
            raise ValueError(f"{directory!r}: config.architectures={archs!r} names no transformers class; pass "
                             "model_cls")
    saved = _read_state_dict(directory)
    model = model_cls(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # as save_pretrained wrote it
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model = model.to(dtype)  # before the swap: the swapped layers take their saved tensors' dtypes
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{directory!r}: {CONFIG_KEY}[{name!r}] must be a dict, got {spec!r}")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)
        except AttributeError as exc:
            raise ValueError(f"{directory!r}: recorded layer {name!r} is not a module of {model_cls.__name__}") from exc
        setattr(parent, child, _build_layer(spec, saved, name + ".", repr(directory)))
    current = model.state_dict()
    mismatched = [f"{k} ({t.dtype} saved, {current[k].dtype} here)" for k, t in saved.items()
                  if k in current and t.dtype != current[k].dtype]
    if mismatched:  # load_state_dict would cast silently (an int8 weight into a float nn.Linear, ...)
        raise ValueError(f"{directory!r}: saved tensors do not fit the rebuilt model: {mismatched[:4]}")
    result = model.load_state_dict(saved, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{directory!r}: saved tensors {result.unexpected_keys[:5]} are not in the model")
    if result.missing_keys:
        model.tie_weights()  # heads tied to embeddings are saved once
        state = model.state_dict()
        loaded = {state[k].data_ptr() for k in saved if k in state}
        untied = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
        if untied:
            raise ValueError(f"{directory!r}: no saved tensor for {untied[:5]}")
    return model.eval()


__all__ = ["make_optimizer", "optimizer_param_groups", "low_rank_targets", "LayerwiseTrainerOptimizer",
           "record_layers", "save_pretrained", "load_pretrained", "OPTIMIZERS"]
