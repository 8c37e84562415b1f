"""Device-agnostic torch code the backends compose with their kernels (passed in): the blocked dequantize-then-BLAS
matmuls (cpu: fp32 blocks; cuda: blocks in the activation dtype + cuBLAS) and GaLore's write-back."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from ..backend import allow_tf32


def blocked_dequant_matmul(x: Tensor, rows: int, cols: int, transpose: bool, block_rows: int,
                           dequant: Callable[[Tensor, int, int], None]) -> Tensor:
    """y = x W^T (transpose=False) or x W (transpose=True) for a quantized W (rows x cols), of which ``dequant(dst,
    r0, nr)`` writes rows [r0, r0 + nr) into dst (nr x cols, fp32, contiguous). At most ``block_rows`` rows are
    dequantized at a time, so the float weight never exists whole:

    * transpose=False: block by block into Y^T (rows x tokens): each block's product is a contiguous row range of
      Y^T that BLAS writes in place, one transpose at the end; a single block writes Y = X W^T directly;
    * transpose=True: Y += X[:, r0:r0+nr] W[r0:r0+nr, :].

    x may have any strides (BLAS takes transposed views without copies); fp32 accumulation, output in x's dtype.
    """
    tokens = x.shape[0]
    step = max(1, min(rows, block_rows))
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    buf = torch.empty((step, cols), dtype=torch.float32, device=x.device)
    if transpose:
        y = torch.zeros((tokens, cols), dtype=torch.float32, device=x.device)
    elif step == rows:
        y = torch.empty((tokens, rows), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((rows, tokens), dtype=torch.float32, device=x.device)  # Y^T
    for r0 in range(0, rows, step):
        nr = min(rows - r0, step)
        block = buf[:nr]
        dequant(block, r0, nr)
        if transpose:
            y.addmm_(xf[:, r0:r0 + nr], block)
        elif step == rows:
            torch.mm(xf, block.t(), out=y)
        else:
            torch.mm(block, xf.t(), out=y[r0:r0 + nr])
    if not transpose and step != rows:
        y = y.t().contiguous()
    return y if y.dtype == x.dtype else y.to(x.dtype)


# -- a float32 product of a 16-bit operand without its float32 copy ------------------------------------------------

# At most this many values of a bfloat16 / float16 operand are converted to float32 at a time (16 MiB): LLaMA-7B's
# 4096 x 11008 bf16 gradient, whole in float32 (172 MiB), was the largest temporary of a Q-GaLore step
FLOAT32_BLOCK = 1 << 22


def float32_by_blocks(t: Tensor, dim: int, out_shape, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(t.to(float32))`` for a 2-D ``t`` whose blocks along ``dim`` map to the result's blocks along ``dim``
    (``fn`` keeps that axis: a product that reduces over the other one). A bfloat16 / float16 ``t`` of more than
    FLOAT32_BLOCK values goes to float32 a block of at most that many values at a time, so that no float32 copy of it
    exists whole; others are converted whole (a float32 one: no copy). The blocks' results equal the whole product's
    up to the product's summation order (each output block is the same sums over the same values). Used by GaLore's
    projections of a 16-bit gradient (weightkit.optim.basis) and by int4_matmul's ``out_dtype=float32`` on the
    backends whose kernels have no float32 output for a 16-bit x."""
    if t.dtype not in (torch.bfloat16, torch.float16):
        return fn(t.to(torch.float32))
    return by_blocks(t, dim, out_shape, lambda b: fn(b.to(torch.float32)))


def by_blocks(t: Tensor, dim: int, out_shape, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(t)`` (float32, ``out_shape``) for a 2-D ``t`` whose blocks along ``dim`` map to the result's blocks along
    ``dim``, a block of at most FLOAT32_BLOCK values at a time where ``t`` holds more (so that the temporaries ``fn``
    makes of its argument, a float32 copy or 16-bit parts, never exist whole)."""
    if t.numel() <= FLOAT32_BLOCK:
        return fn(t)
    size = t.shape[dim]
    step = max(1, FLOAT32_BLOCK // max(t.numel() // size, 1))
    out = torch.empty(out_shape, dtype=torch.float32, device=t.device)
    for i in range(0, size, step):
        n = min(step, size - i)
        out.narrow(dim, i, n).copy_(fn(t.narrow(dim, i, n)))
    return out


def matmul_out_dtype(x: Tensor, n_out: int, out_dtype: Optional[torch.dtype],
                     matmul: Callable[[Tensor], Tensor]) -> Tensor:
    """A backend's int8/int4 matmul of x (any rank) with ``out_dtype``: ``matmul(x2)`` (x2: x as 2-D, the product in
    x2's dtype) for None or x's dtype; for ``out_dtype=float32`` and a 16-bit x, ``matmul`` of x converted to float32
    by blocks of rows (float32_by_blocks): the float32 weight values, never rounded to x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if out_dtype is None or out_dtype == x.dtype:
        y = matmul(x2)
    else:
        y = float32_by_blocks(x2, 0, (x2.shape[0], n_out), matmul)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)


# -- the cuda backend's int8_matmul / int4_matmul: "dequantize to the activation dtype + cuBLAS" -------------------

# At most this many bytes of dequantized weight exist at a time. A layer's whole weight fits up to 2^26 values in bf16
# (8192 x 8192: 128 MB, twice its int8 storage, freed right after the product and reused by the caching allocator for
# the next layer), so the common layer sizes take one dequantization and one GEMM, whose efficiency no blocking then
# touches (a block of 2048 rows would leave 256 tokens x 2048 outputs = 32 tiles of 128 x 128 for 132 SMs). Larger
# weights (vocabulary heads) take blocks of this size, still >= 1024 output features for inputs up to 64K wide.
DEQUANT_BLOCK_BYTES = 1 << 27
# block boundaries along the output features are multiples of this (16-byte vectors, whole GEMM tiles)
DEQUANT_BLOCK_ALIGN = 128


def _dequantized_blocks(rows: int, cols: int, transpose: bool, dequant: Callable[..., None], dtype: torch.dtype,
                        device: torch.device, block_bytes: Optional[int]):
    """(o0, W_block) for each block of output features of y = x W^T (transpose=False) or x W (transpose=True): the
    block as the product's right operand (K x no, a view of one reused buffer: rows of W, transposed, for
    transpose=False; columns of W for transpose=True), dequantized into ``dtype`` by ``dequant(dst, r0, nr, c0, nc)``
    (writes W[r0:r0+nr, c0:c0+nc] into dst, nr x nc, contiguous). Blocks of at most ``block_bytes``
    (DEQUANT_BLOCK_BYTES), whole multiples of DEQUANT_BLOCK_ALIGN features but for the last; K, n_out > 0."""
    n_out, k = (cols, rows) if transpose else (rows, cols)
    step = max(1, (block_bytes or DEQUANT_BLOCK_BYTES) // (k * dtype.itemsize))
    if step < n_out:
        step = max(DEQUANT_BLOCK_ALIGN, step // DEQUANT_BLOCK_ALIGN * DEQUANT_BLOCK_ALIGN)
    step = min(step, n_out)
    buf = torch.empty(step * k, dtype=dtype, device=device)
    for o0 in range(0, n_out, step):
        no = min(step, n_out - o0)
        if transpose:  # W[:, o0:o0+no], rows x no
            w = buf[:rows * no].view(rows, no)
            dequant(w, 0, rows, o0, no)
            yield o0, w
        else:  # W[o0:o0+no, :], no x cols
            w = buf[:no * cols].view(no, cols)
            dequant(w, o0, no, 0, cols)
            yield o0, w.t()


def dequant_matmul(x: Tensor, rows: int, cols: int, transpose: bool, dequant: Callable[..., None],
                   block_bytes: Optional[int] = None) -> Tensor:
    """y = x W^T (transpose=False) or x W (transpose=True) for a 2-D x (any strides) and a quantized W (rows x cols):
    W is dequantized to x's dtype, a block of output features at a time, and each block multiplied by torch.mm
    (cuBLAS on a GPU: 16-bit x on tensor cores with fp32 accumulation; fp32 x in fp32, or TF32 where
    ``torch.backends.cuda.matmul.allow_tf32`` allows it, as nn.Linear does). ``dequant(dst, r0, nr, c0, nc)`` writes
    W[r0:r0+nr, c0:c0+nc] into dst (nr x nc, contiguous, x's dtype).

    Blocks run along the output features, so each block's product is final (no accumulation across blocks in a
    16-bit dtype): rows of W for transpose=False, columns of W for transpose=True; each product goes to its column
    range of y. Output in x's dtype. ``block_bytes``: DEQUANT_BLOCK_BYTES unless given."""
    tokens = x.shape[0]
    n_out, k = (cols, rows) if transpose else (rows, cols)
    y = torch.empty((tokens, n_out), dtype=x.dtype, device=x.device)
    if tokens == 0 or n_out == 0:
        return y
    if k == 0:
        return y.zero_()
    for o0, w in _dequantized_blocks(rows, cols, transpose, dequant, x.dtype, x.device, block_bytes):
        no = w.shape[1]
        torch.mm(x, w, out=y if no == n_out else y[:, o0:o0 + no])
    return y


def split3_bf16_(w: Tensor):
    """(hi, mid, lo): float32 ``w`` as three bf16 tensors, hi + mid + lo == w exactly (each the nearest bf16 of what
    the previous ones left, the differences exact: 3 x 8 bits hold float32's 24-bit significand). ``w`` is
    overwritten with remainders (a copy of a tensor still needed goes in)."""
    hi = w.to(torch.bfloat16)
    return (hi, *_split2_remainder(w.sub_(hi)))


def split3_bf16(w: Tensor):
    """:func:`split3_bf16_` leaving ``w`` as it is (one float32 remainder made, instead of a copy of ``w`` and its
    in-place remainders: one pass over ``w`` fewer)."""
    hi = w.to(torch.bfloat16)
    return (hi, *_split2_remainder(w - hi))


def _split2_remainder(rem: Tensor):
    """(mid, lo) of a float32 remainder after the first bf16 part (``rem`` overwritten)."""
    mid = rem.to(torch.bfloat16)
    return mid, rem.sub_(mid).to(torch.bfloat16)


def split2_fp16_(x: Tensor):
    """(hi, lo): float16 ``x`` as two bf16 tensors, hi + lo == x exactly: hi is x with its three lowest significand
    bits cleared (8 significant bits, truncated toward zero: never beyond |x|, so never overflowing float16 on the
    way), lo = x - hi (exact: the difference of two float16 values within a factor 2 of each other, at most 3
    significant bits); both exact in bf16's 8-bit significand and wider exponent range. |lo| < 2^-7 |x| for a normal
    x (a subnormal's lo is below 2^-21)."""
    hi = _fp16_hi(x)
    return hi.to(torch.bfloat16), (x - hi).to(torch.bfloat16)


def _fp16_hi(x: Tensor) -> Tensor:
    """float16 ``x`` with its three lowest significand bits cleared (:func:`split2_fp16_`'s hi part, in float16)."""
    return (x.view(torch.int16) & -8).view(torch.float16)


def split3_mm_float32(x: Tensor, parts, x_left: bool, tensor_cores: bool,
                      stack: Optional[Callable[[Tensor, int], Tensor]] = None) -> Tensor:
    """The float32 ``x @ W`` (x_left) or ``W @ x`` of a 2-D ``x`` (bf16, float16 or float32) and W given as its three
    bf16 parts (:func:`split3_bf16_`), by :func:`mm_float32` (with ``tensor_cores``, a GPU's: bf16 tensor cores with
    float32 accumulation and results; else upcast), summed in float32, smallest first: the float32 product's
    accuracy without a float32 copy of a 16-bit x, nor cuBLAS's strict-fp32 GEMM for a float32 one.

    * bf16 x: three products, each exact, made by one GEMM of x with W's parts side by side (x read once; the result
      3x as wide, rank-sized, then its thirds summed).
    * float16 x (not bf16-exact: 11-bit significands): x in two bf16 parts too (:func:`split2_fp16_`), five exact
      products, the sixth (x's lo part times W's, below 2^-23 of |x||W| a term) left out.
    * float32 x: x in three bf16 parts (hi + mid + lo == x), the six products whose significands reach 2^-16 of the
      leading one, the three left out below 2^-24 of |x||W| a term.

    A split x goes a block at a time (:func:`by_blocks`: no part of a large x whole): its parts are written once into
    one bf16 buffer, stacked along the product's inner dimension ([x_0; x_1; x_2], part 0 the largest), and the
    products of part i of x and part j of W (0: hi), terms of order 2^-8(i + j), are made by level L = i + j, one
    GEMM a level over a prefix of the stack: [W_L ... W_0] @ [x_0; ...; x_L] (inner size (L + 1) k at most), the
    levels summed smallest first (two float32 additions of the rank-sized results). ``stack(block, dim)`` makes a
    block's stacked parts (by default :func:`stacked_parts`, torch's elementwise ops; the optimizers pass
    weightkit.ops.galore.bf16_parts, one CUDA or Triton pass on a GPU)."""
    hi, mid, lo = parts
    dim = 1 if x_left else 0  # W's parts side by side along the product's other dimension: x read once a GEMM
    k = hi.shape[dim]
    if x.dtype == torch.bfloat16:
        y = _side_by_side(x, torch.cat((lo, mid, hi), dim), x_left, tensor_cores).split(k, dim)
        return y[0].add(y[1]).add_(y[2])
    if x.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"split3_mm_float32 takes a bf16, float16 or float32 x, got {x.dtype}")
    w_parts = (hi, mid, lo)
    count = part_count(x.dtype)  # x's parts
    # x's dimension ``dim`` is the product's inner one (its columns for x @ W, its rows for W @ x), W's is 1 - dim;
    # level L's W operand: [W_L ... W_0] along it, matching the stack's parts 0 .. L
    levels = [torch.cat([w_parts[level - i] for i in range(min(level, count - 1) + 1)], 1 - dim)
              for level in (2, 1, 0)]

    def block(xb):
        stacked = (stack or stacked_parts)(xb, dim)
        acc = None
        for level, w in zip((2, 1, 0), levels):
            xs = stacked.narrow(dim, 0, (min(level, count - 1) + 1) * xb.shape[dim])
            y = _side_by_side(xs, w, x_left, tensor_cores)
            acc = y if acc is None else acc.add_(y)
        return acc
    shape = (x.shape[0], hi.shape[1]) if x_left else (hi.shape[0], x.shape[1])
    return by_blocks(x, 0 if x_left else 1, shape, block)


def part_count(dtype: torch.dtype) -> int:
    """How many exact bf16 parts a value of ``dtype`` takes: three of a float32, two of a float16."""
    return 3 if dtype == torch.float32 else 2


def stacked_shape(x: Tensor, dim: int):
    """(count, shape) of x's stacked bf16 parts (:func:`stacked_parts`): :func:`part_count` parts along ``dim``."""
    count = part_count(x.dtype)
    shape = list(x.shape)
    shape[dim] *= count
    return count, tuple(shape)


def stacked_parts(x: Tensor, dim: int) -> Tensor:
    """x's exact bf16 parts (two of a float16 x, as :func:`split2_fp16_`; three of a float32 x, as
    :func:`split3_bf16`, each the nearest bf16 of what the previous ones left), largest first, written once into one
    bf16 tensor, stacked along ``dim`` (:func:`stacked_shape`). A float32 x: four elementwise passes (about 30 bytes
    moved a value); a float16 x: three (about 14 bytes)."""
    count, shape = stacked_shape(x, dim)
    size = x.shape[dim]
    out = torch.empty(shape, dtype=torch.bfloat16, device=x.device)
    part = [out.narrow(dim, i * size, size) for i in range(count)]
    if count == 2:  # split2_fp16_'s parts, written in place
        hi = _fp16_hi(x)
        part[0].copy_(hi)
        torch.sub(x, hi, out=part[1])  # exact in float16, and in bf16
        return out
    part[0].copy_(x)  # hi: x rounded to bf16
    rem = torch.sub(x, part[0])  # exact, float32
    part[1].copy_(rem)  # mid
    torch.sub(rem, part[1], out=part[2])  # lo: exact, and exact in bf16 (at most 8 significant bits)
    return out


def _side_by_side(x: Tensor, w: Tensor, x_left: bool, tensor_cores: bool) -> Tensor:
    """The float32 ``x @ w`` (x_left) or ``w @ x`` (:func:`mm_float32`), ``w`` holding parts side by side."""
    return mm_float32(x, w, tensor_cores) if x_left else mm_float32(w, x, tensor_cores)


# the products of two three-part splits (part indices) whose significands reach 2^-16 of the leading one, smallest
# first: the three left out are below 2^-24 of |a||b| (float32 accuracy)
SIX_PRODUCTS = ((0, 2), (1, 1), (2, 0), (0, 1), (1, 0), (0, 0))


def split3_dequant_matmul(x: Tensor, rows: int, cols: int, transpose: bool, dequant: Callable[..., None],
                          tensor_cores: bool, block_bytes: Optional[int] = None,
                          stack: Optional[Callable[[Tensor, int], Tensor]] = None) -> Tensor:
    """The float32 y = x W^T (transpose=False) or x W (transpose=True) of a bfloat16 or float16 x (2-D, any strides;
    a float16 x also split, in two bf16 parts, a block of rows at a time: five products, :func:`split3_mm_float32`)
    and a quantized W (rows x cols), without a float32 copy of x: W's float32 values, dequantized a block of output
    features at a time (``dequant(dst, r0, nr, c0, nc)`` writes W[r0:r0+nr, c0:c0+nc] into the float32 dst), are
    split in three bf16 parts (hi + mid + lo == W exactly: 3 x 8 bits hold float32's 24-bit significand), and x is
    multiplied by each part, smallest first, in float32 (:func:`mm_float32`; with ``tensor_cores``, the cuda
    backend's: cuBLAS on bf16 tensor cores with fp32 accumulation and a float32 result; else upcast, the same exact
    products). Each product is exact, so
    the result has the float32 product's accuracy, at three bf16 GEMMs' cost instead of one strict-fp32 GEMM's
    (several times slower on a GPU) plus x's conversion. W's block holds at most ``block_bytes``
    (DEQUANT_BLOCK_BYTES) of float32 values, and its three parts half as much each. ``stack``: how a float16 x's
    parts are made (:func:`split3_mm_float32`)."""
    tokens = x.shape[0]
    n_out, k = (cols, rows) if transpose else (rows, cols)
    if tokens == 0 or n_out == 0 or k == 0:
        return torch.zeros((tokens, n_out), dtype=torch.float32, device=x.device)
    y = None  # one block (the common case): its product is the result; several: each written into y
    for o0, w in _dequantized_blocks(rows, cols, transpose, dequant, torch.float32, x.device, block_bytes):
        acc = split3_mm_float32(x, split3_bf16_(w), True, tensor_cores, stack)  # (the block is not needed afterwards)
        if o0 == 0 and w.shape[1] == n_out:
            return acc
        if y is None:
            y = torch.empty((tokens, n_out), dtype=torch.float32, device=x.device)
        y[:, o0:o0 + w.shape[1]] = acc
    return y


def int4_matmul_blocked(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                       transpose: bool, dequantize_into: Callable, block_values: int) -> Tensor:
    """The cpu int4_matmul: y = x W^T or x W, W = dequant (rows x cols = ``shape``), x of any rank and strides,
    through :func:`blocked_dequant_matmul` with about ``block_values`` dequantized values per block; the backend's
    ``dequantize_into(out, packed, scale, zero, group_size, e0, e1)`` writes the flat elements [e0, e1)."""
    rows, cols = shape
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()

    def dequant(dst, r0, nr):
        dequantize_into(dst, packed, scale, zero, group_size, r0 * cols, (r0 + nr) * cols)

    y = blocked_dequant_matmul(x2, rows, cols, transpose, block_values // max(cols, 1), dequant)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


# -- GaLore's write-back (weightkit/ops/galore.py), after the backend's kernel computed U ---------------------------

# the float32 product of the blocked update holds at most this many values (16 MB) at a time
BLOCK_ELEMENTS = 1 << 22


def matmul_precision(device: torch.device) -> str:
    """'tf32' where the user allows TF32 for float32 matmuls on this device (CUDA and
    ``torch.backends.cuda.matmul.allow_tf32``), else 'ieee'."""
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def step_coef(step_size: float, scale: float, step_size_t: Optional[Tensor]):
    """step_size * scale, as a Python float or (a step size counted on the device) a one-element tensor."""
    return step_size * scale if step_size_t is None else step_size_t * scale


def flag_ptr(found_inf: Optional[Tensor]) -> int:
    """The data pointer of a device flag for a native kernel (0: none). One float32 value: the op checked it."""
    return 0 if found_inf is None else found_inf.data_ptr()


def keep_unless_found(dst: Tensor, new: Tensor, found_inf: Optional[Tensor]) -> None:
    """``dst <- new``, except where the device flag ``found_inf`` is set (nonzero): there ``dst`` keeps its values.
    The references' form of the kernels' predicated stores (no host read)."""
    if found_inf is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(found_inf.ne(0).reshape(()), dst, new))


def masked_low_rank_adam(low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                         eps: float, found_inf: Tensor) -> Tensor:
    """U (float32) with M, V updated in place, except where ``found_inf`` is set: there M and V stay and U = 0
    (the predicated step of ``nonfinite='skip'``, decided on the device)."""
    m = exp_avg.mul(beta1).add_(low_grad, alpha=1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(low_grad, low_grad, value=1 - beta2)
    update = m / (v.sqrt() + eps)
    keep_unless_found(exp_avg, m, found_inf)
    keep_unless_found(exp_avg_sq, v, found_inf)
    return update.masked_fill_(found_inf.ne(0), 0.0)


def mm_float32(a: Tensor, b: Tensor, tensor_cores: bool) -> Tensor:
    """a @ b as float32. 16-bit operands: with ``tensor_cores`` (a GPU) on 16-bit tensor cores with fp32 accumulation
    (torch.mm's out_dtype); else upcast (exact products, fp32 sums: the CPU's way)."""
    if a.dtype == torch.float32:
        return a @ b
    if tensor_cores:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype: 16-bit output, fp32 accumulation
            return (a @ b).to(torch.float32)
    return a.to(torch.float32) @ b.to(torch.float32)


_FLOAT32_MM: dict = {}


def float32_mm_of_bf16(device: torch.device) -> bool:
    """Whether :func:`mm_float32` of bf16 operands on ``device`` gives the float32 sums of their exact products: on a
    GPU, whether this torch's ``torch.mm`` takes ``out_dtype=torch.float32`` (CUDA's ``aten::mm.dtype``, which
    torch 2.11 has; else mm_float32 rounds the result to bf16); elsewhere it upcasts. Asked once per device (a 1 x 1
    product)."""
    if device.type != "cuda":
        return True
    ok = _FLOAT32_MM.get(device)
    if ok is None:
        a = torch.ones((1, 1), dtype=torch.bfloat16, device=device)
        try:
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            ok = False
        _FLOAT32_MM[device] = ok
    return ok


def split_products_apply(device: torch.device) -> bool:
    """Whether a float32-accurate product on ``device``'s tensor cores goes as exact products of bf16 splits (the
    cuda backend's and GaLore's split paths; their callers decide that tensor cores run): where TF32 is not allowed
    (:func:`matmul_precision` 'ieee') and torch's mm gives bf16 operands a float32 result
    (:func:`float32_mm_of_bf16`)."""
    return matmul_precision(device) == "ieee" and float32_mm_of_bf16(device)


def six_pair_operands(a: Tensor, b: Tensor):
    """The bf16 operands of one GEMM whose float32 result is the float32 product ``a @ b`` of float32 ``a`` (m x k)
    and ``b`` (k x n) to float32 accuracy: each split in three bf16 parts (:func:`split3_bf16`: the inputs are not
    changed), the six products of parts whose significands reach 2^-16 of the leading one (SIX_PRODUCTS, smallest
    first; the three left out are below 2^-24 of |a||b|) side by side along the inner dimension:
    ([a_i ...] m x 6k, [b_j ...] 6k x n). Row blocks of the first times the second are the product's row blocks
    (:func:`mm_float32` with tensor cores: bf16 tensor cores, float32 accumulation and result)."""
    a, b = split3_bf16(a), split3_bf16(b)
    return torch.cat([a[i] for i, _ in SIX_PRODUCTS], dim=1), torch.cat([b[j] for _, j in SIX_PRODUCTS], dim=0)


def split_write_back_applies(ortho: Tensor, update: Tensor, tensor_cores: bool) -> bool:
    """Whether :func:`apply_update_blocked` forms N from three-part bf16 splits of float32 P and U: with
    ``tensor_cores`` (a GPU's) where :func:`split_products_apply`."""
    return (tensor_cores and ortho.dtype == torch.float32 and update.dtype == torch.float32
            and split_products_apply(ortho.device))


def apply_update_blocked(weight: Tensor, ortho: Tensor, update: Tensor, left: bool, coef, decay: float,
                         found_inf: Optional[Tensor], tensor_cores: bool) -> None:
    """W <- (W - coef N) * decay, N = P U | U P, a block of rows at a time (a float32 product of at most
    BLOCK_ELEMENTS values, never m x n); U in P's dtype (16-bit products on tensor cores where ``tensor_cores``);
    where ``found_inf`` is set W is left unchanged.

    A float32 P and U where :func:`split_write_back_applies` (a GPU where TF32 is not allowed: torch's default
    matmul setting): each split in three bf16 parts (:func:`split3_bf16_`), N as the six products of parts whose
    significands reach 2^-16 of the leading one (SIX_PRODUCTS; the three left out are below 2^-24 of |P||U|:
    float32 accuracy), made by one bf16 GEMM with float32 accumulation and result whose inner dimension holds the
    six pairs side by side ([a_i ...] (rows x 6k) @ [b_j ...] (6k x n), smallest pair first): no per-product
    float32 temporaries, instead of cuBLAS's strict-fp32 GEMM, whose FMA path is several times slower. The
    concatenated parts hold 3x the bytes of float32 P and U (rank-sized, never m x n)."""
    m, n = weight.shape
    rows = max(1, min(m, BLOCK_ELEMENTS // max(n, 1)))
    skip = None if found_inf is None else found_inf.ne(0)
    split = split_write_back_applies(ortho, update, tensor_cores)
    if split:  # the row-blocked operand (P: left; U: right) and the whole one, their parts side by side
        blocked, whole = six_pair_operands(*((ortho, update) if left else (update, ortho)))
    for r0 in range(0, m, rows):
        block = weight[r0:r0 + rows]
        if split:
            prod = mm_float32(blocked[r0:r0 + rows], whole, tensor_cores)
        else:
            prod = (mm_float32(ortho[r0:r0 + rows], update, tensor_cores) if left
                    else mm_float32(update[r0:r0 + rows], ortho, tensor_cores))
        new = prod.mul_(-coef if not isinstance(coef, Tensor) else coef.neg()).add_(block.to(torch.float32))
        new.mul_(decay)
        block.copy_(new if skip is None else torch.where(skip, block, new))


def low_rank_update(weight: Tensor, update: Tensor, ortho: Tensor, left: bool, step_size: float, scale: float,
                    decay: float, found_inf: Optional[Tensor], step_size_t: Optional[Tensor],
                    tensor_cores: bool) -> None:
    """GaLore's W <- decay W - step_size scale decay (P U | U P), after the backend's kernel wrote U (float32): for a
    float32 weight and basis, BLAS addmm_ straight into W (no full-size temporary); otherwise (bf16/fp16 weights,
    16-bit bases) block of rows by block of rows.

    Predicated (a device-side ``found_inf``: U is 0 where it is set, :func:`masked_low_rank_adam`), a float32 weight
    takes W <- (W - a P U) * decay' with one addmm_ (adding exactly 0 where the flag is set) and, with weight decay,
    one scaling by decay' = 1 where the flag is set, else decay; a device-side step size scales U (low-rank) first.
    A float32 weight where :func:`split_write_back_applies` (a GPU without TF32) goes by blocks of rows too, its N
    from bf16 splits on tensor cores (float32 accuracy), not from addmm_'s strict-fp32 GEMM."""
    if (weight.dtype == torch.float32 and ortho.dtype == torch.float32
            and not split_write_back_applies(ortho, update, tensor_cores)):
        if found_inf is None and step_size_t is None:
            alpha = -step_size * scale * decay
            if left:
                weight.addmm_(ortho, update, beta=decay, alpha=alpha)
            else:
                weight.addmm_(update, ortho, beta=decay, alpha=alpha)
            return
        if step_size_t is not None:
            update = update.mul_(step_size_t)
            alpha = -scale
        else:
            alpha = -step_size * scale
        if left:
            weight.addmm_(ortho, update, alpha=alpha)
        else:
            weight.addmm_(update, ortho, alpha=alpha)
        if decay != 1.0:
            weight.mul_(decay if found_inf is None else torch.where(found_inf.ne(0), 1.0, decay))
        return
    if ortho.dtype != torch.float32:
        update = update.to(ortho.dtype)
    apply_update_blocked(weight, ortho, update, left, step_coef(step_size, scale, step_size_t), decay, found_inf,
                         tensor_cores)


def galore_adam_update_composed(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                                left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                                decay: float, found_inf: Optional[Tensor], step_size_t: Optional[Tensor], *,
                                low_rank_adam: Callable, tensor_cores: bool) -> None:
    """The cpu/cuda GaLore step: the backend's ``low_rank_adam(low_grad, exp_avg, exp_avg_sq, update, beta1, beta2,
    eps)`` kernel updates M, V and writes U in one pass (with a device-side ``found_inf``, torch does it predicated:
    :func:`masked_low_rank_adam`); then BLAS applies P U (:func:`low_rank_update`: no full-size temporary).
    weight, exp_avg, exp_avg_sq contiguous (the op makes them so)."""
    low_grad = low_grad.contiguous()
    if found_inf is not None:
        update = masked_low_rank_adam(low_grad, exp_avg, exp_avg_sq, beta1, beta2, eps, found_inf)
    else:
        update = torch.empty_like(low_grad)
        low_rank_adam(low_grad, exp_avg, exp_avg_sq, update, beta1, beta2, eps)
    low_rank_update(weight, update, ortho.contiguous(), left, step_size, scale, decay, found_inf, step_size_t,
                    tensor_cores)


def galore_adam_update_of(low_rank_adam: Callable, tensor_cores: bool, module: str) -> Callable:
    """A backend's ``galore_adam_update_`` (the op's signature): :func:`galore_adam_update_composed` of that
    backend's ``low_rank_adam`` kernel and its 16-bit tensor-core choice; ``module``: the backend module that owns
    it (its ``__name__``: tests/test_backend.py checks where each implementation lives)."""

    def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                            left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                            decay: float, found_inf: Optional[Tensor] = None,
                            step_size_t: Optional[Tensor] = None) -> None:
        galore_adam_update_composed(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size,
                                    scale, decay, found_inf, step_size_t, low_rank_adam=low_rank_adam,
                                    tensor_cores=tensor_cores)

    galore_adam_update_.__module__ = module
    return galore_adam_update_


def lowrank_update_of(tensor_cores: bool, module: str) -> Callable:
    """A backend's ``lowrank_update_`` (weightkit.ops.galore: the write-back of a given direction U): BLAS applies
    P U as in :func:`galore_adam_update_composed`, on a copy of U where :func:`low_rank_update` would change it (a
    device step size scales U in place; under a device flag a float32 weight relies on U = 0 where it is set, which
    the caller's U need not be): the op does not modify its ``update``."""

    def lowrank_update_(weight: Tensor, update: Tensor, ortho: Tensor, left: bool, step_size: float, scale: float,
                        decay: float, found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
        if found_inf is not None:
            update = update.masked_fill(found_inf.ne(0), 0.0)  # a new tensor
        elif step_size_t is not None:
            update = update.clone()
        low_rank_update(weight, update.contiguous(), ortho.contiguous(), left, step_size, scale, decay, found_inf,
                        step_size_t, tensor_cores)

    lowrank_update_.__module__ = module
    return lowrank_update_

# -- Q-GaLore's write-back (weightkit/ops/qgalore.py) by the existing kernels, a block of rows at a time ---------------

# the composition computes N for about this many weight elements at a time
ROWS_ELEMENTS = 1 << 20


def rounded_to(t: Tensor, precision: str) -> Tensor:
    """The operand of a product in ``precision``: bf16-rounded values (kept in float32) for 'bf16', else ``t``."""
    return t.to(torch.bfloat16).to(torch.float32) if precision == "bf16" else t


def basis_shape(w_q: Tensor, update: Tensor, left: bool):
    """The (rows, cols) of the basis P for an m x n weight and a low-rank update U: (m, r) for a left projection
    (U: r x n), (r, n) for a right one (U: m x r)."""
    m, n = w_q.shape
    return (m, update.shape[0]) if left else (update.shape[1], n)


def lowrank_factor(alpha: float, step_size_t: Optional[Tensor]):
    """The factor of N = P U in int8_sr_lowrank_update_'s delta: -alpha, or -(alpha * step_size_t) (one float32
    product, as the Triton kernel forms it) for a step size counted on the device."""
    return -alpha if step_size_t is None else (step_size_t.reshape(()) * alpha).neg_()


def lowrank_operands(blocked: Tensor, whole: Tensor, precision: str, tensor_cores: bool):
    """(a, b, tensor_cores') such that ``mm_float32(a[r0:r1], b, tensor_cores')`` is row block r0:r1 of Q-GaLore's
    float32 product N = blocked @ whole (P U: blocked = P; U P: blocked = U) at ``precision``
    (weightkit.ops.qgalore), never TF32 whatever ``torch.backends.cuda.matmul.allow_tf32`` says:

    * 'bf16': both operands rounded to bf16, their exact products summed in float32 (with ``tensor_cores``, a GPU's,
      on bf16 tensor cores with a float32 result);
    * 'fp32', 'tf32x3', 'bf16x3' (float32 accuracy): with ``tensor_cores`` where torch's mm gives bf16 operands a
      float32 result (:func:`float32_mm_of_bf16`), one bf16 GEMM over the six pairs of three-part splits
      (:func:`six_pair_operands`: float32 accuracy at six bf16 products' cost, no strict-fp32 or TF32 GEMM);
      else the float32 operands (the caller multiplies them with TF32 off: :func:`strict_float32`)."""
    tc = tensor_cores and float32_mm_of_bf16(blocked.device)
    if precision == "bf16":
        if tc:
            return blocked.to(torch.bfloat16), whole.to(torch.bfloat16), True
        return rounded_to(blocked, precision), rounded_to(whole, precision), False
    if tc:
        return (*six_pair_operands(blocked, whole), True)
    return blocked, whole, False


def strict_float32(device: torch.device):
    """A context in which float32 matmuls on ``device`` run without TF32 (a CUDA device:
    ``weightkit.backend.allow_tf32(False)``, the user's setting put back after; elsewhere nothing changes): for a
    product whose precision is asked for, not left to the user's matmul setting."""
    return allow_tf32(False) if device.type == "cuda" else contextlib.nullcontext()


def sr_lowrank_update_composed(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor, ortho_zero: Tensor,
                               update: Tensor, group_size: int, proj_group_size: int, left: bool, alpha: float,
                               decay: float, precision: str, seed: int, offset: int,
                               found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None, *,
                               dequantize: Callable, sr_update: Callable, tensor_cores: bool = False) -> None:
    """W_q, scale <- SR((W_q scale - alpha N) decay), N = P U | U P, composed of a backend's kernels: its
    ``dequantize`` (dequantize_int4) makes the float basis once for the call (the size of P: r/n of the weight's
    float32 bytes at most), then N and the delta for ~ROWS_ELEMENTS weight elements at a time go through its
    ``sr_update`` (int8_sr_update_) on those rows, its stream position shifted to the block's first element, so the
    result is the unfused sequence's. N at ``precision`` by :func:`lowrank_operands` (``tensor_cores``: the cuda
    backend's bf16 tensor cores; never TF32)."""
    m, n = w_q.shape
    ortho = dequantize(ortho_q, ortho_scale, ortho_zero, proj_group_size).reshape(basis_shape(w_q, update, left))
    ortho = ortho.to(torch.float32)
    blocked, whole, tc = lowrank_operands(*((ortho, update) if left else (update, ortho)), precision, tensor_cores)
    groups_per_row = n // group_size
    block = max(1, ROWS_ELEMENTS // n)
    factor = lowrank_factor(alpha, step_size_t)
    with strict_float32(w_q.device):
        for r0 in range(0, m, block):
            r1 = min(m, r0 + block)
            delta = mm_float32(blocked[r0:r1], whole, tc)
            delta.mul_(factor)
            sr_update(w_q[r0:r1], scale.view(-1)[r0 * groups_per_row:r1 * groups_per_row], delta, group_size, decay,
                      seed, offset + r0 * n, found_inf)


def sr_lowrank_update_of(dequantize: Callable, sr_update: Callable, module: str, tensor_cores: bool) -> Callable:
    """A backend's ``int8_sr_lowrank_update_`` (the op's signature): :func:`sr_lowrank_update_composed` of that
    backend's ``dequantize`` (dequantize_int4) and ``sr_update`` (int8_sr_update_) and its bf16 tensor-core choice
    (``tensor_cores``); ``module``: the backend module that owns it (its ``__name__``: tests/test_backend.py checks
    where each implementation lives)."""

    def int8_sr_lowrank_update_(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor,
                                ortho_zero: Tensor, update: Tensor, group_size: int, proj_group_size: int, left: bool,
                                alpha: float, decay: float, precision: str, seed: int, offset: int,
                                found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
        sr_lowrank_update_composed(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size,
                                   left, alpha, decay, precision, seed, offset, found_inf, step_size_t,
                                   dequantize=dequantize, sr_update=sr_update, tensor_cores=tensor_cores)

    int8_sr_lowrank_update_.__module__ = module
    return int8_sr_lowrank_update_


def memory_rows(x: Tensor, tables: Tensor, grad: Optional[Tensor] = None):
    """The prologue that the cpu and cuda MemoryFormer host code share: x (and grad) as contiguous row matrices
    (n, K tau) and (n, d_out), the tables contiguous, and the sizes (n, K, buckets, d_out, tau). Returns
    (x2, g2 or None, tables, (n, K, buckets, d_out, tau))."""
    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    g2 = None if grad is None else (grad if grad.dim() == 2 else grad.reshape(-1, grad.shape[-1])).contiguous()
    k, buckets, d_out = tables.shape
    return x2, g2, tables.contiguous(), (x2.shape[0], k, buckets, d_out, buckets.bit_length() - 1)
