"""Host-side integer helpers for the launchers: plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton releases, whose
``__call__`` unwraps every argument and builds a dict per call (several microseconds on a host that launches a
decode kernel in ~10 us); a launcher calls them a few times per op call, so they are kept off the call path."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
