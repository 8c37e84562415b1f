"""Small models used by the main job, the tests and the benchmarks (no downloads)."""

from .llama import LlamaConfig, TinyLlama
from .minilm import load_minilm, minilm_embed

__all__ = ["LlamaConfig", "TinyLlama", "load_minilm", "minilm_embed"]
