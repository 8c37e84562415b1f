"""The launchers' host-side integer helpers (weightkit.kernels._host) agree with their definitions."""

import math

from weightkit.kernels._host import cdiv, next_pow2


def test_cdiv_and_next_pow2():
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 64, 1000):
            assert cdiv(a, b) == math.ceil(a / b)
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 63, 64, 65, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 64, 64, 128, 4096,
                                                                                   8192]
    assert all(next_pow2(n) >= n and next_pow2(n) & (next_pow2(n) - 1) == 0 and next_pow2(n) < 2 * max(n, 1)
               for n in range(1, 5000))
