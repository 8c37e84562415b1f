"""triton backend of weightkit/ops/dictionary.py (S in the bitmask format)."""

from __future__ import annotations

from torch import Tensor


def dict_bitmask_matmul(z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor) -> Tensor:
    from ...kernels.dictionary import dict_bitmask_matmul_triton

    return dict_bitmask_matmul_triton(z.contiguous(), values.contiguous(), bitmask.contiguous(),
                                      word_offsets.contiguous())


def dict_bitmask_matmul_backward(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor, word_offsets: Tensor):
    from ...kernels.dictionary import dict_bitmask_matmul_backward_triton

    return dict_bitmask_matmul_backward_triton(grad.contiguous(), z.contiguous(), values.contiguous(),
                                               bitmask.contiguous(), word_offsets.contiguous())
