"""Counter-based random numbers shared bit-for-bit by every backend.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11). Element ``g`` of a stream
(``g = offset + i``) takes lane ``g % 4`` of the block for counter ``g // 4`` under key ``seed`` (64 bits, split in
two 32-bit words). The uniform value is ``(bits >> 8) * 2**-24``: 24 random bits, exactly representable in fp32,
in ``[0, 1)``. The C++, CUDA and Triton kernels implement the same function, so a seed reproduces a result
exactly on any backend.

This PyTorch version is the specification. It uses int64 tensors and splits the 32x32-bit products into 16-bit
halves so that nothing overflows.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**63  # seeds travel as int64 through torch.library schemas


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product a*b, for a < 2**32 and b int64 in [0, 2**32)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    high_part = a * b_hi  # < 2**48
    t = a * b_lo + ((high_part & 0xFFFF) << 16)  # < 2**49
    return (high_part >> 16) + (t >> 32), t & MASK32


def philox4x32_block(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on counter words c0..c3 (int64 tensors holding 32-bit values) under key (k0, k1)."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, seed: int, rounds: int = 10):
    """The four 32-bit outputs (int64 tensors) for 64-bit counters ``counter`` (int64 >= 0), key ``seed``."""
    zero = torch.zeros_like(counter)
    return philox4x32_block(counter & MASK32, (counter >> 32) & MASK32, zero, zero.clone(),
                            seed & MASK32, (seed >> 32) & MASK32, rounds)


def uniform(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """``numel`` fp32 uniforms in [0, 1) for stream positions ``offset .. offset + numel - 1``."""
    check_seed(seed, offset)
    g = torch.arange(numel, dtype=torch.int64, device=device) + offset
    outs = torch.stack(philox4x32(g >> 2, seed), dim=0)
    bits = outs.gather(0, (g & 3).unsqueeze(0)).squeeze(0)
    return (bits >> 8).to(torch.float32) * (2.0**-24)


def check_seed(seed: int, offset: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or not 0 <= offset < SEED_LIMIT:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")
