"""Property tests (hypothesis) across shapes, dtypes and arguments: every backend == reference.

The number of examples per property is set by the ``WEIGHTKIT_HYPOTHESIS_EXAMPLES`` environment variable
(default 25, so CI stays fast; raise it for a fuzzing run).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import usable_backends
from weightkit import use_backend
from weightkit.ops import quant

EXAMPLES = int(os.environ.get("WEIGHTKIT_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def _backends_agree(table, fn, *args):
    with use_backend("reference"):
        expected = fn(*args)
    for name in usable_backends(table, "cpu"):
        with use_backend(name):
            got = fn(*args)
        yield name, got, expected


@SETTINGS
@given(
    groups=st.integers(1, 12),
    group_size=st.sampled_from([1, 2, 3, 8, 32, 100]),
    dtype=DTYPES,
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**40),
)
def test_stochastic_round_int8_backends_agree(groups, group_size, dtype, magnitude, seed, offset):
    x = (torch.randn(groups * group_size) * magnitude).to(dtype)
    scale = quant.absmax_scale(x, group_size)
    for name, got, expected in _backends_agree(quant._SR, quant.stochastic_round_int8, x, scale, group_size, seed, offset):
        assert torch.equal(got, expected), name
        # never more than one step away from x / scale
        steps = x.float().reshape(-1, group_size) / scale[:, None]
        assert bool(((got.float().reshape(-1, group_size) - steps).abs() <= 1 + 1e-4).all()), name
