"""Shared test setup. Triton kernels run on CPU through the interpreter when there is no GPU; the variable must
be set before triton compiles anything, hence here, before weightkit is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from weightkit import backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def usable_backends(table, device):
    """The backends of ``table`` (a weightkit.backend.KernelTable) that can run on ``device``, reference first."""
    device = torch.device(device)
    return [b for b in backend.BACKENDS if table.why_not(b, device) is None]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    yield
