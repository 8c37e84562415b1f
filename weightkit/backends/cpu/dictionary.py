"""cpu backend of weightkit/ops/dictionary.py: S in the bitmask format.

Up to DICT_BITMASK_DIRECT_TOKENS tokens the kernels read the bitmask directly; beyond, S^T is decoded to a dense fp32
matrix (d_out x k, in blocks of DICT_BITMASK_DENSE_BLOCK values) per call and torch's BLAS multiplies (backward:
grad_z = grad S^T, and grad S^T = grad^T z gathered at S's nonzeros). Measured at 1024 x 1024, k = 464, s = 232
(ratio 0.3), 2 threads, best of 5, two runs on an idle 2-core VM, 2026-11-26 (ms at 1 / 2 / 3 / 4 / 5 / 8 tokens):
forward direct 0.20 / 0.23 / 0.26 / 0.30 / 0.32-0.34 / 0.40-0.41 vs dense 0.22 / 0.26 / 0.28-0.34 / 0.29-0.33 /
0.28-0.36 / 0.29-0.34; backward direct 0.29 / 0.40 / 0.50-0.51 / 0.63 / 0.73-0.75 / 1.03-1.06 vs dense 0.48 /
0.56-0.58 / 0.78-0.83 / 0.59-0.83 / 0.58-0.74 / 0.72-0.83. Both paths cost about k d_out per call, plus s d_out
(direct) or k d_out (BLAS) per token, so at DictLinear's s ~ k / 2 the crossover does not move with the layer's size.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import native
from . import check, threads

DICT_BITMASK_DIRECT_TOKENS = 4
# The dense path decodes at most this many values of S^T at a time (16 MB of fp32), so a large layer's S never
# exists whole in fp32.
DICT_BITMASK_DENSE_BLOCK = 1 << 22


def bitmask_blocks(k: int, d_out: int):
    step = max(1, min(d_out, DICT_BITMASK_DENSE_BLOCK // max(k, 1)))
    return [(c0, min(d_out, c0 + step)) for c0 in range(0, d_out, step)], step


def _decode(buf: Tensor, values: Tensor, bitmask: Tensor, offsets: Tensor, c0: int, c1: int) -> Tensor:
    """Columns [c0, c1) of S as the rows of buf[:c1 - c0] (fp32, dense), returned."""
    s, d_out = values.shape
    k = buf.shape[1]
    check(native.CPU.dict_bitmask_to_dense_t(values.data_ptr(), native.FLOAT_CODES[values.dtype], bitmask.data_ptr(),
                                             offsets.data_ptr(), native.OFFSET_CODES[offsets.dtype], buf.data_ptr(),
                                             k, s, d_out, c0, c1, threads()), "dict_bitmask_matmul")
    return buf[:c1 - c0]


def dict_bitmask_matmul(z: Tensor, values: Tensor, bitmask: Tensor, offsets: Tensor) -> Tensor:
    """z (n x k), values (s x d_out), bitmask and offsets (W x d_out): y = z S in z's dtype."""
    z, values, bitmask, offsets = z.contiguous(), values.contiguous(), bitmask.contiguous(), offsets.contiguous()
    n, k = z.shape
    s, d_out = values.shape
    if n > DICT_BITMASK_DIRECT_TOKENS:
        zf = z.to(torch.float32)
        blocks, step = bitmask_blocks(k, d_out)
        buf = torch.empty((step, k), dtype=torch.float32)
        if len(blocks) == 1:
            y = torch.mm(zf, _decode(buf, values, bitmask, offsets, 0, d_out).t())
        else:  # Y^T block by block (contiguous row ranges that BLAS writes in place), one transpose at the end
            yt = torch.empty((d_out, n), dtype=torch.float32)
            for c0, c1 in blocks:
                torch.mm(_decode(buf, values, bitmask, offsets, c0, c1), zf.t(), out=yt[c0:c1])
            y = yt.t().contiguous()
        return y if y.dtype == z.dtype else y.to(z.dtype)
    y = torch.empty((n, d_out), dtype=z.dtype)
    check(native.CPU.dict_bitmask_forward(z.data_ptr(), native.FLOAT_CODES[z.dtype], values.data_ptr(),
                                          native.FLOAT_CODES[values.dtype], bitmask.data_ptr(), offsets.data_ptr(),
                                          native.OFFSET_CODES[offsets.dtype], y.data_ptr(), n, k, s, d_out, threads()),
          "dict_bitmask_matmul")
    return y


def dict_bitmask_matmul_backward(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor,
                                 offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_z in z's dtype, grad_values in values' dtype); deterministic."""
    grad, z, values = grad.contiguous(), z.contiguous(), values.contiguous()
    bitmask, offsets = bitmask.contiguous(), offsets.contiguous()
    n, k = z.shape
    s, d_out = values.shape
    if n > DICT_BITMASK_DIRECT_TOKENS:
        gf, zf = grad.to(torch.float32), z.to(torch.float32)
        blocks, step = bitmask_blocks(k, d_out)
        buf = torch.empty((step, k), dtype=torch.float32)
        grad_z = torch.zeros((n, k), dtype=torch.float32) if len(blocks) > 1 else None
        grad_values = torch.empty(values.shape, dtype=values.dtype)
        for c0, c1 in blocks:  # grad_z: the blocks' products added in order (deterministic)
            g_block = gf[:, c0:c1]
            s_t = _decode(buf, values, bitmask, offsets, c0, c1)
            if grad_z is None:
                grad_z = torch.mm(g_block, s_t)
            else:
                grad_z.addmm_(g_block, s_t)
            grad_s_t = torch.mm(g_block.t(), zf, out=buf[:c1 - c0])  # columns [c0, c1) of grad S, as rows
            check(native.CPU.dict_bitmask_gather_dense_t(grad_s_t.data_ptr(), bitmask.data_ptr(), offsets.data_ptr(),
                                                         native.OFFSET_CODES[offsets.dtype], grad_values.data_ptr(),
                                                         native.FLOAT_CODES[values.dtype], k, s, d_out, c0, c1,
                                                         threads()), "dict_bitmask_matmul_backward")
        return (grad_z if grad_z.dtype == z.dtype else grad_z.to(z.dtype)), grad_values
    zc, g = z, grad
    if grad.dtype != z.dtype:  # one dtype for both in the kernel: fp32, which holds either exactly
        zc, g = z.to(torch.float32), grad.to(torch.float32)
    grad_z = torch.empty((n, k), dtype=zc.dtype)
    grad_values = torch.empty(values.shape, dtype=values.dtype)
    check(native.CPU.dict_bitmask_backward(g.data_ptr(), zc.data_ptr(), native.FLOAT_CODES[zc.dtype],
                                           values.data_ptr(), native.FLOAT_CODES[values.dtype], bitmask.data_ptr(),
                                           offsets.data_ptr(), native.OFFSET_CODES[offsets.dtype], grad_z.data_ptr(),
                                           grad_values.data_ptr(), n, k, s, d_out, threads()),
          "dict_bitmask_matmul_backward")
    return (grad_z if grad_z.dtype == z.dtype else grad_z.to(z.dtype)), grad_values
