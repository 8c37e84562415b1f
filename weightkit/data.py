"""Real text found on every Python install, for the main job and the tests (no downloads).

``pydoc_data.topics`` is the text of Python's interactive help (the language reference sections): about 460 kB of
English prose and code, shipped with CPython itself.
"""

from __future__ import annotations

import torch


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def byte_corpus(val_fraction: float = 0.05):
    """(train, val) uint8->int64 token tensors of the corpus bytes; the split is the last ``val_fraction``."""
    data = torch.frombuffer(bytearray(corpus_text().encode("utf-8")), dtype=torch.uint8).to(torch.int64)
    n_val = int(len(data) * val_fraction)
    return data[:-n_val], data[-n_val:]


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random (input, target) windows of ``seq_len`` tokens."""
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def windows(data: torch.Tensor, seq_len: int, max_windows: int = 0):
    """(inputs, targets) of every non-overlapping ``seq_len`` window of ``data`` (in order; targets are the inputs
    shifted by one token), for a deterministic evaluation over a whole split. ``max_windows`` > 0 keeps the first
    that many."""
    n = (len(data) - 1) // seq_len
    if n < 1:
        raise ValueError(f"seq_len={seq_len} is longer than the split ({len(data)} tokens)")
    if max_windows > 0:
        n = min(n, max_windows)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]
