"""triton backend of weightkit/ops/int8.py."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    from ...kernels.int8 import stochastic_round_int8_triton

    return stochastic_round_int8_triton(x.contiguous(), scale.contiguous(), group_size, seed, offset)


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, decay: float, seed: int,
                    offset: int, found_inf: Optional[Tensor] = None) -> None:
    from ...kernels.int8 import int8_sr_update_triton

    int8_sr_update_triton(w_q, scale, delta.contiguous(), group_size, decay, seed, offset, found_inf)


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    from ...kernels.int8 import int8_matmul_triton

    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    y = int8_matmul_triton(x2, w_q.contiguous(), scale.contiguous(), group_size, transpose)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
