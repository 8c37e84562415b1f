"""INT8 stochastic rounding (Q-GaLore, arXiv 2407.08296).

``stochastic_round_int8(x, scale, group_size, seed, offset)`` quantizes ``x`` in groups of ``group_size``
consecutive elements (row-major order), group ``j`` sharing ``scale[j]``:

    q = clamp(floor(x * (1 / scale) + u), -128, 127),   u ~ U[0, 1) from Philox (weightkit.ops.rng)

so that E[q * scale] = x inside the representable range. The product and the sum are rounded separately in
fp32 (no fused multiply-add), which every backend follows, so results agree bit for bit across backends for a
given (seed, offset).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import KernelTable, rows_of, tf32_allowed, token_bucket
from ..backends._blocked import keep_unless_found
from ..backends.cpu import int8 as cpu_int8
from ..backends.cuda import int8 as cuda_int8
from ..backends.triton import int8 as triton_int8
from . import rng
from ._checks import (FLOAT_DTYPES, check_flag, check_positive_int, check_tensor, debug_checks_enabled, exact_div,
                      require_finite)
from ._registry import define

__all__ = ["stochastic_round_int8", "absmax_scale", "int8_matmul", "dequantize_int8", "int8_sr_update_"]

# auto on CUDA: Triton first, measured faster on an H200 (2026-11-26,
# bench/results/nvidia-h200-2026-11-26-gpu-report.json): 8192^2 fp32 0.108 ms (74% of copy bandwidth) vs cuda 0.197
# auto by measurement per regime (weightkit/backend.py, "Measured choice"): element count rounded up to a power of two,
# dtype, group size; the static order is the fallback.
_SR = KernelTable("stochastic_round_int8", cuda_order=("triton", "cuda"),
                  regime=lambda x, scale, group_size, *_: (token_bucket(x.numel()), x.dtype, group_size))


def _check_sr_args(x: Tensor, scale: Tensor, group_size: int) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("group_size", group_size)
    if x.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide x.numel()={x.numel()}")
    check_tensor("scale", scale, dtypes=(torch.float32,), device=x.device)
    if scale.numel() != x.numel() // group_size:
        raise ValueError(
            f"scale must hold one value per group: x.numel() / group_size = {x.numel() // group_size}, "
            f"got scale.numel() = {scale.numel()}"
        )


@_SR.register("reference")
def stochastic_round_int8_reference(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    xf = x.reshape(-1, group_size).to(torch.float32)
    inv = 1.0 / scale.reshape(-1, 1)
    u = rng.uniform(x.numel(), seed, offset, device=x.device).reshape(-1, group_size)
    q = torch.floor(xf * inv + u)  # eager torch rounds the product and the sum separately, like the kernels
    return q.clamp_(-128, 127).to(torch.int8).reshape(x.shape)


_SR.register("cpu")(cpu_int8.stochastic_round_int8)
_SR.register("cuda")(cuda_int8.stochastic_round_int8)
_SR.register("triton")(triton_int8.stochastic_round_int8)


def _sr_impl(x, scale, group_size, seed, offset):
    rng.check_seed(seed, offset)  # values, not metadata (symbolic under torch.compile): eager only
    return _SR(x.device, x, scale, group_size, seed, offset)


def _check_sr_data(x, scale, group_size, seed, offset):
    require_finite("x", x)
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise ValueError("scale must be positive and finite in every group")


_stochastic_round_int8_op = define(
    "stochastic_round_int8(Tensor x, Tensor scale, SymInt group_size, SymInt seed, SymInt offset) -> Tensor",
    impl=_sr_impl, check=lambda x, scale, group_size, *_: _check_sr_args(x, scale, group_size),
    debug_check=_check_sr_data, fake=lambda x, *_: torch.empty(x.shape, dtype=torch.int8, device=x.device))


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int = 0) -> Tensor:
    """Quantize ``x`` to int8 by unbiased stochastic rounding (see the module docstring).

    Args:
        x: float32/float16/bfloat16 tensor of any shape; groups run over its row-major order.
        scale: float32, one positive value per group (``x.numel() // group_size`` of them).
        group_size: elements per group; must divide ``x.numel()``.
        seed, offset: Philox key and stream position of ``x``'s first element, both in [0, 2**63).
    """
    rng.check_seed(seed, offset)  # before the op: values past int64 cannot cross the schema
    return _stochastic_round_int8_op(x, scale, group_size, seed, offset)


# ---------------------------------------------------------------------------------------------------------
# Fused INT8 weight update (Q-GaLore's write-back): dequantize, add the update, re-scale, stochastic rounding.
#
# ``int8_sr_update_(w_q, scale, delta, group_size, decay, seed, offset)`` performs, group by group, in place:
#     w      = (w_q * scale + delta) * decay                 (float32, one op at a time)
#     scale' = max(max|w| / 127, FLT_MIN)                    (= absmax_scale(w))
#     w_q'   = stochastic_round_int8(w, scale', seed, offset)
# without materialising w: every backend reads w_q, scale and delta once per pass (two passes per group) and
# writes w_q and scale. Bit-identical to the unfused sequence for the same (seed, offset).
# ``found_inf`` (optional, a one-element float32 tensor on w_q's device, GradScaler's convention): where it is
# nonzero nothing is written, decided on the device (the optimizers' nonfinite='skip' and layer-wise steps).

# auto on CUDA: Triton first (H200, 2026-11-26: 8192^2 group 128, 0.282 ms vs cuda 0.370)
# (measured per regime on copies of w_q and scale, which it writes; the Triton fast path needs offset % 4 == 0)
_SR_UPDATE = KernelTable("int8_sr_update_", cuda_order=("triton", "cuda"), mutates=(0, 1),
                         regime=lambda w_q, scale, delta, group_size, decay, seed, offset, *_: (
                             token_bucket(w_q.numel()), delta.dtype, group_size, offset % 4 == 0))


def _check_sr_update_args(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int,
                          found_inf: Optional[Tensor] = None) -> None:
    check_tensor("w_q", w_q, dtypes=(torch.int8,))
    check_flag("found_inf", found_inf, w_q.device)
    check_tensor("scale", scale, dtypes=(torch.float32,), device=w_q.device)
    check_tensor("delta", delta, dtypes=FLOAT_DTYPES, device=w_q.device)
    check_positive_int("group_size", group_size)
    if delta.shape != w_q.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)}, w_q has {tuple(w_q.shape)}")
    if w_q.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide w_q.numel()={w_q.numel()}")
    if scale.numel() != w_q.numel() // group_size:
        raise ValueError(f"scale must hold one value per group ({w_q.numel() // group_size}), got {scale.numel()}")
    if not (w_q.is_contiguous() and scale.is_contiguous()):
        raise ValueError("w_q and scale are updated in place and must be contiguous")


@_SR_UPDATE.register("reference")
def int8_sr_update_reference(w_q, scale, delta, group_size, decay, seed, offset, found_inf=None):
    w = (dequantize_int8(w_q, scale, group_size) + delta.to(torch.float32)) * decay
    new_scale = absmax_scale(w, group_size)
    keep_unless_found(w_q, stochastic_round_int8_reference(w, new_scale, group_size, seed, offset), found_inf)
    keep_unless_found(scale, new_scale.reshape(scale.shape), found_inf)


_SR_UPDATE.register("cpu")(cpu_int8.int8_sr_update_)
_SR_UPDATE.register("cuda")(cuda_int8.int8_sr_update_)
_SR_UPDATE.register("triton")(triton_int8.int8_sr_update_)


def _sr_update_impl(w_q, scale, delta, group_size, decay, seed, offset, found_inf=None):
    rng.check_seed(seed, offset)  # values, not metadata: eager only
    if not math.isfinite(decay):
        raise ValueError(f"decay must be finite, got {decay}")
    # The NaN/Inf check of delta: a non-finite delta would make its groups' scale and weights garbage, in place.
    # Reading delta's values costs a host sync on a GPU (it would stall the launch queue and cannot be captured in
    # a CUDA graph), none on the CPU: by default it runs for CPU tensors only. On a GPU the callers guard instead:
    # the Q-GaLore optimizers check every gradient once per step (one sync) before any update, so their deltas are
    # finite. weightkit.debug_checks() / WEIGHTKIT_DEBUG_CHECKS=1 turn it on everywhere, debug_checks(False) off.
    # With a device flag (found_inf) a non-finite delta is the flagged case, where nothing is written: not checked.
    if found_inf is None and debug_checks_enabled(default=delta.device.type == "cpu"):
        require_finite("delta", delta)
    _SR_UPDATE(w_q.device, w_q, scale, delta, group_size, float(decay), seed, offset, found_inf)


_int8_sr_update_op = define(
    "int8_sr_update_(Tensor(a0!) w_q, Tensor(a1!) scale, Tensor delta, SymInt group_size, float decay, SymInt seed, "
    "SymInt offset, Tensor? found_inf=None) -> ()",
    impl=_sr_update_impl,
    check=lambda w_q, scale, delta, group_size, decay, seed, offset, found_inf=None: _check_sr_update_args(
        w_q, scale, delta, group_size, found_inf),
    # the data check of delta runs in _sr_update_impl: by default on the CPU only, where it costs no sync
    fake=lambda *args: None)


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, *, decay: float = 1.0, seed: int = 0,
                    offset: int = 0, found_inf: Optional[Tensor] = None) -> None:
    """In place: ``w_q, scale <- SR((w_q * scale + delta) * decay)`` with a fresh per-group absmax scale.

    Args:
        w_q: int8 weight (contiguous), updated in place.
        scale: float32 per-group scales (``w_q.numel() // group_size``, contiguous), updated in place.
        delta: the float update (same shape as ``w_q``; float32/bf16/fp16).
        decay: decoupled weight-decay factor applied after the update (1 - lr * weight_decay).
        seed, offset: the Philox key and the stream position of the first element (see stochastic_round_int8).
        found_inf: optional one-element float32 tensor on w_q's device; where it is nonzero, w_q and scale are left
            unchanged (decided on the device: no host read).

    A non-finite ``delta`` would leave its groups' weights and scale unusable. CPU tensors are checked (a ValueError
    naming ``delta``, nothing written); CUDA tensors are not by default, since the check would cost a host sync per
    call and break CUDA-graph capture: check ``delta`` before the call, or turn the check on with
    ``weightkit.debug_checks()`` / ``WEIGHTKIT_DEBUG_CHECKS=1``. The Q-GaLore optimizers check their gradients
    once per step before any update.
    """
    rng.check_seed(seed, offset)
    _int8_sr_update_op(w_q, scale, delta, group_size, float(decay), seed, offset, found_inf)


def absmax_scale(x: Tensor, group_size: int, qmax: int = 127) -> Tensor:
    """Per-group symmetric scale ``max|x| / qmax`` (float32), floored so that an all-zero group stays valid."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("group_size", group_size)
    if x.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide x.numel()={x.numel()}")
    amax = x.detach().reshape(-1, group_size).abs().amax(dim=1).to(torch.float32)
    return exact_div(amax, qmax).clamp_min(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------------------------
# INT8 weight x float activation matmul.
#
# ``int8_matmul(x, w_q, scale, group_size, transpose)`` with W = dequant(w_q) (out x in, groups of ``group_size``
# consecutive elements of each row sharing a scale):
#     transpose=False:  y = x W^T    (x: (..., in)  -> (..., out))   Int8Linear forward
#     transpose=True:   y = x W      (x: (..., out) -> (..., in))    its input gradient
# The reference dequantizes W whole. Backends: triton dequantizes tile by tile in registers (fused GEMV / GEMM);
# cuda dequantizes W to x's dtype (blocks of at most 128 MB) and multiplies with cuBLAS; cpu dequantizes blocks of
# ~4M values to fp32 (or reads int8 directly for <= 8 tokens) around BLAS. Precision contract: see int8_matmul.

# auto on CUDA: Triton first: decode (1-16 tokens) is bound by the weight's bytes, which only the fused kernels read
# once (the dequantize + cuBLAS path writes and reads the weight again in x's dtype); the lead's per-shape measured
# choice picks cuda where its GEMM wins (prefill). H200, 2026-11-26, 8192^2 g128, bf16 x: triton 0.167 / 0.166 / 0.122
# / 1.82 ms at 1 / 16 / 256 / 4096 tokens (the cuda figures of that run were of the former strict-fp32 design)
# Measured per regime: token bucket, weight shape, group size, transpose, x's dtype, TF32 allowed (fp32 x).


def _mm_regime(x, w_q, scale, group_size, transpose):  # (evaluated per call on a GPU: kept to plain lookups)
    shape, dtype = x.shape, x.dtype
    rows = shape[0] if len(shape) == 2 else rows_of(x)
    return (1 << (rows - 1).bit_length() if rows > 1 else 1, w_q.shape, group_size, transpose, dtype,
            dtype is torch.float32 and tf32_allowed())


_INT8_MM = KernelTable("int8_matmul", cuda_order=("triton", "cuda"), regime=_mm_regime)


def _check_int8_mm_args(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> None:
    dev = x.device
    if (x.dtype in FLOAT_DTYPES and w_q.dtype == torch.int8 and scale.dtype == torch.float32 and w_q.dim() == 2
            and w_q.device == dev and scale.device == dev and type(group_size) is int and group_size > 0
            and x.dim() and x.numel() and w_q.numel() and not w_q.shape[1] % group_size
            and scale.numel() == w_q.numel() // group_size and x.shape[-1] == w_q.shape[0 if transpose else 1]):
        return  # the usual valid call, in one expression (half the cost of the checks below, which name the error)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, nonempty=False, min_ndim=1)  # no tokens: an empty result
    check_tensor("w_q", w_q, dtypes=(torch.int8,), ndim=2, device=x.device)
    check_positive_int("group_size", group_size)
    out_f, in_f = w_q.shape
    if in_f % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={in_f} (groups stay within a row)")
    check_tensor("scale", scale, dtypes=(torch.float32,), device=x.device)
    if scale.numel() != w_q.numel() // group_size:
        raise ValueError(f"scale must hold {w_q.numel() // group_size} values (one per group), got {scale.numel()}")
    need = out_f if transpose else in_f
    if x.shape[-1] != need:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, expected {need} "
                         f"({'out' if transpose else 'in'}_features of w_q with shape {tuple(w_q.shape)})")


def dequantize_int8(w_q: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """float32 W = w_q * scale, group by group (row-major groups of ``group_size``)."""
    return (w_q.reshape(-1, group_size).to(torch.float32) * scale.reshape(-1, 1)).reshape(w_q.shape)


@_INT8_MM.register("reference")
def int8_matmul_reference(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)  # float64 inputs stay float64 (gradcheck)
    w = dequantize_int8(w_q, scale, group_size).to(compute)
    y = x.to(compute) @ (w if transpose else w.T)
    return y.to(x.dtype)


_INT8_MM.register("cpu")(cpu_int8.int8_matmul)
_INT8_MM.register("cuda")(cuda_int8.int8_matmul)
_INT8_MM.register("triton")(triton_int8.int8_matmul)


def _int8_matmul_fake(x, w_q, scale, group_size, transpose):
    return x.new_empty((*x.shape[:-1], w_q.shape[1] if transpose else w_q.shape[0]))


def _int8_matmul_setup(ctx, inputs, output):
    _, w_q, scale, group_size, transpose = inputs
    ctx.save_for_backward(w_q, scale)
    ctx.group_size, ctx.transpose = group_size, transpose


def _int8_matmul_backward(ctx, grad):
    w_q, scale = ctx.saved_tensors
    return _int8_matmul_op(grad.contiguous(), w_q, scale, ctx.group_size, not ctx.transpose), None, None, None, None


_int8_matmul_op = define(
    "int8_matmul(Tensor x, Tensor w_q, Tensor scale, SymInt group_size, bool transpose) -> Tensor",
    table=_INT8_MM,
    check=_check_int8_mm_args, debug_check=lambda x, *_: require_finite("x", x), fake=_int8_matmul_fake,
    backward=_int8_matmul_backward, setup_context=_int8_matmul_setup, empty=lambda x, *_: x.numel() == 0)


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool = False) -> Tensor:
    """``x @ dequant(w_q)^T`` (or ``x @ dequant(w_q)`` with ``transpose``), in x's dtype.
    Differentiable in ``x``; the weight's gradient is computed by Int8Linear (weightkit.nn.int8).

    Precision contract (every backend; tests/ops/test_int8_ops.py checks it against float64): each weight
    ``q * scale`` is computed in fp32 and may be rounded once to x's dtype before the products, as bitsandbytes and
    torchao do (the cuda backend does: dequantize to x's dtype + cuBLAS; so do the triton backend's tensor-core
    kernels where the weight is scaled before the dot; its GEMV and the cpu backend keep it in fp32); products and
    sums in fp32 (for fp32 x on a GPU, TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it, as nn.Linear
    does); the output rounded once to x's dtype.
    With u the unit roundoff of x's dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32) and S = |x| @ |W|^T:
    ``|y - x W^T| <= u |x W^T| + (u + K 2^-23) S`` up to second-order terms (K: the reduced dimension; TF32 off)."""
    return _int8_matmul_op(x, w_q, scale, group_size, bool(transpose))
