"""weightkit's compiled kernels as Python sees them: the two libraries built from csrc/, loaded with ctypes, and one
function per op that the ops' ``cpu`` and ``cuda`` backends call.

Why ctypes and plain C functions instead of a torch C++ extension: ``libweightkit_cpu.so`` and
``libweightkit_cuda.so`` link neither libtorch nor Python (see csrc/weightkit.h), so one build, one wheel, loads under
every torch release weightkit supports; a C++ extension loads only under the torch it was compiled against. The
public ops stay torch custom ops (``torch.ops.weightkit.*``, defined in weightkit/ops via ``_registry.define``); the
functions here are their cpu/cuda implementations. Each one allocates its outputs with torch, passes raw pointers,
sizes and dtype codes to one C function (its ctypes object cached with its argtypes set, so a call costs about a
microsecond of host time), and does with torch what used to be ATen calls inside the C++ extension: dtype
conversions, BLAS matmuls (int8/int4 matmuls for many tokens, the GaLore projection) and the sort of the
deterministic MemoryFormer backward. The CUDA kernels run on torch's current stream of the tensors' device, so they
order with torch's own work exactly as the extension's kernels did.

The callers (weightkit/ops/*.py) have checked shapes, dtypes and devices and pass contiguous tensors where a
function says so; nothing is re-validated here. The CPU kernels use up to ``torch.get_num_threads()`` threads.

Loading: the libraries are looked up in ``weightkit/lib/`` (built there by ``pip install`` / ``python setup.py
build_ext --inplace``). ``WEIGHTKIT_DISABLE_EXTENSION=1`` skips them. :data:`CPU` and :data:`CUDA` are the loaded
libraries or None, with the reason in :data:`CPU_ERROR` / :data:`CUDA_ERROR` (weightkit.backend reports them).
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
CPU_LIB = "libweightkit_cpu.so"
CUDA_LIB = "libweightkit_cuda.so"
ABI_VERSION = 2  # WK_ABI_VERSION of csrc/weightkit.h

# wk_dtype codes of csrc/weightkit.h
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INDEX_CODES = {torch.uint8: 3, torch.int16: 4, torch.int32: 5, torch.int64: 6}
_STATUS = {1: "unsupported dtype", 2: "out of memory for its scratch buffer",
           3: "malformed codes (with weightkit.debug_checks() the op's data check names the problem)"}

_P, _I, _I64, _U64, _F, _D = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float,
                              ctypes.c_double)
_DEV = (_I, _P)  # CUDA functions end with (device index, cudaStream_t)

# The argument types of every function of csrc/weightkit.h (all return int).
_CPU_SIGNATURES: Dict[str, tuple] = {
    "wk_cpu_abi_version": (),
    "wk_cpu_stochastic_round_int8": (_P, _I, _P, _P, _I64, _I64, _U64, _U64, _I),
    "wk_cpu_int8_sr_update": (_P, _P, _P, _I, _I64, _I64, _F, _U64, _U64, _I),
    "wk_cpu_int8_matvec": (_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I, _I),
    "wk_cpu_int8_dequantize_rows": (_P, _P, _P, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_quantize_int4": (_P, _P, _P, _P, _I64, _I64, _I),
    "wk_cpu_dequantize_int4": (_P, _P, _P, _P, _I64, _I64, _I64, _I),
    "wk_cpu_low_rank_adam": (_P, _P, _P, _P, _I64, _F, _F, _F, _I),
    "wk_cpu_memory_lookup_forward": (_P, _I, _P, _I, _P, _I64, _I64, _I64, _I64, _I, _D, _I),
    "wk_cpu_memory_lookup_backward": (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I, _D, _I),
    "wk_cpu_dict_gather_forward": (_P, _P, _P, _I, _P, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_dict_gather_forward_t": (_P, _P, _P, _I, _P, _I64, _I64, _I64, _I),
    "wk_cpu_dict_gather_backward": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_dict_bitmask_forward": (_P, _I, _P, _I, _P, _P, _I, _P, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_dict_bitmask_backward": (_P, _P, _I, _P, _I, _P, _P, _I, _P, _P, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_dict_bitmask_to_dense_t": (_P, _I, _P, _P, _I, _P, _I64, _I64, _I64, _I64, _I64, _I),
    "wk_cpu_dict_bitmask_gather_dense_t": (_P, _P, _P, _I, _P, _I, _I64, _I64, _I64, _I64, _I64, _I),
}
_CUDA_SIGNATURES: Dict[str, tuple] = {
    "wk_cuda_abi_version": (),
    "wk_cuda_probe": (_I,),
    "wk_cuda_stochastic_round_int8": (_P, _I, _P, _P, _I64, _I64, _U64, _U64) + _DEV,
    "wk_cuda_int8_sr_update": (_P, _P, _P, _I, _I64, _I64, _F, _U64, _U64) + _DEV,
    "wk_cuda_int8_dequantize_rows": (_P, _P, _P, _I64, _I64, _I64, _I64) + _DEV,
    "wk_cuda_quantize_int4": (_P, _P, _P, _P, _I64, _I64) + _DEV,
    "wk_cuda_dequantize_int4": (_P, _P, _P, _P, _I64, _I64, _I64) + _DEV,
    "wk_cuda_low_rank_adam": (_P, _P, _P, _P, _I64, _F, _F, _F) + _DEV,
    "wk_cuda_memory_lookup_forward": (_P, _I, _P, _I, _P, _I64, _I64, _I64, _I64, _I, _D) + _DEV,
    "wk_cuda_memory_lookup_backward": (_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I, _D, _I) + _DEV,
    "wk_cuda_memory_segment_sum": (_P, _P, _P, _P, _P, _I64, _I64, _I64) + _DEV,
    "wk_cuda_dict_gather_forward": (_P, _P, _P, _P, _I64, _I64, _I64, _I64) + _DEV,
    "wk_cuda_dict_gather_backward": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64) + _DEV,
}


class Library:
    """A loaded kernel library: each C function is an attribute named without its ``wk_cpu_`` / ``wk_cuda_``
    prefix (a ctypes function with argtypes and restype set)."""

    def __init__(self, path: str, prefix: str, signatures: Dict[str, tuple]):
        self.path = path
        self._dll = ctypes.CDLL(path)
        for name, argtypes in signatures.items():
            fn = getattr(self._dll, name)  # AttributeError: a stale library without this function
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            setattr(self, name[len(prefix):], fn)
        version = self.abi_version()
        if version != ABI_VERSION:
            raise OSError(f"{os.path.basename(path)} has ABI version {version}, this weightkit needs {ABI_VERSION}")


def _load(name: str, prefix: str, signatures: Dict[str, tuple], missing: str) -> Tuple[Optional[Library], Optional[str]]:
    if os.environ.get("WEIGHTKIT_DISABLE_EXTENSION") == "1":
        return None, "disabled by WEIGHTKIT_DISABLE_EXTENSION=1"
    path = os.path.join(LIB_DIR, name)
    if not os.path.exists(path):
        return None, f"{name} not found in {LIB_DIR} ({missing})"
    try:
        return Library(path, prefix, signatures), None
    except (OSError, AttributeError) as exc:  # unloadable (e.g. glibc too old), or stale: rebuild
        return None, f"{name} did not load ({type(exc).__name__}: {exc}); rebuild with `pip install .`"


CPU, CPU_ERROR = _load(CPU_LIB, "wk_cpu_", _CPU_SIGNATURES, "weightkit was installed without building its kernels")
CUDA, CUDA_ERROR = _load(CUDA_LIB, "wk_cuda_", _CUDA_SIGNATURES, "not built: setup.py builds it when nvcc is found "
                         "and torch has CUDA, or with WEIGHTKIT_WITH_CUDA=1; the CUDA wheel ships it")
if CUDA is not None:
    _cuda_error_string = CUDA._dll.wk_cuda_error_string
    _cuda_error_string.argtypes, _cuda_error_string.restype = (ctypes.c_int,), ctypes.c_char_p
    _cuda_archs = CUDA._dll.wk_cuda_archs
    _cuda_archs.argtypes, _cuda_archs.restype = (), ctypes.c_char_p
    CUDA_ARCHS = tuple(_cuda_archs().decode().split(";"))
else:
    CUDA_ARCHS = ()

_PROBED: Dict[int, Optional[str]] = {}


def cuda_error_string(code: int) -> str:
    return _cuda_error_string(code).decode() if CUDA is not None else f"CUDA error {code}"


def cuda_why_not(device: torch.device) -> Optional[str]:
    """None when the CUDA library's kernels can run on ``device`` (probed once per device), else why not."""
    if CUDA is None:
        return CUDA_ERROR
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROBED:
        code = CUDA.probe(index)
        if code == 0:
            _PROBED[index] = None
        else:
            cap = torch.cuda.get_device_capability(index)
            _PROBED[index] = (f"{CUDA_LIB} cannot run on cuda:{index} (sm_{cap[0]}{cap[1]}; built for "
                              f"sm_{', sm_'.join(CUDA_ARCHS)} + PTX): {cuda_error_string(code)}")
    return _PROBED[index]


def _check(status: int, name: str) -> None:
    if status:
        raise RuntimeError(f"weightkit cpu kernel {name} failed: {_STATUS.get(status, f'status {status}')}")


def _check_cuda(status: int, name: str) -> None:
    if status:
        raise RuntimeError(f"weightkit cuda kernel {name} failed: {cuda_error_string(status)}")


_get_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t: Tensor) -> Tuple[int, int]:
    """(device index, cudaStream_t of torch's current stream there) for a CUDA tensor."""
    index = t.get_device()
    if _get_raw_stream is not None:
        return index, _get_raw_stream(index)
    return index, torch.cuda.current_stream(index).cuda_stream


_threads = torch.get_num_threads

# ---------------------------------------------------------------------------------------------------------------------
# INT8 (weightkit/ops/int8.py)


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    """x, scale contiguous."""
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    args = (x.data_ptr(), FLOAT_CODES[x.dtype], scale.data_ptr(), out.data_ptr(), x.numel(), group_size, seed, offset)
    if x.is_cuda:
        _check_cuda(CUDA.stochastic_round_int8(*args, *_stream(x)), "stochastic_round_int8")
    else:
        _check(CPU.stochastic_round_int8(*args, _threads()), "stochastic_round_int8")
    return out


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, decay: float, seed: int,
                    offset: int) -> None:
    """In place on w_q and scale; all three contiguous."""
    args = (w_q.data_ptr(), scale.data_ptr(), delta.data_ptr(), FLOAT_CODES[delta.dtype], scale.numel(), group_size,
            decay, seed, offset)
    if w_q.is_cuda:
        _check_cuda(CUDA.int8_sr_update(*args, *_stream(w_q)), "int8_sr_update_")
    else:
        _check(CPU.int8_sr_update(*args, _threads()), "int8_sr_update_")


def _blocked_dequant_matmul(x: Tensor, rows: int, cols: int, transpose: bool, block_rows: int,
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


# Up to this many tokens the CPU int8 matmul reads the int8 weight directly (wk_cpu_int8_matvec), never dequantizing.
INT8_MATVEC_TOKENS = 8


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    """x: 2-D contiguous; w_q, scale contiguous. y = x W^T, or x W with transpose (W = dequant(w_q))."""
    out_f, in_f = w_q.shape
    q, s = w_q.data_ptr(), scale.data_ptr()
    if x.is_cuda:
        device, stream = _stream(x)

        def dequant(dst, r0, nr):
            _check_cuda(CUDA.int8_dequantize_rows(q, s, dst.data_ptr(), r0, nr, in_f, group_size, device, stream),
                        "int8_matmul")

        return _blocked_dequant_matmul(x, out_f, in_f, transpose, (1 << 24) // max(in_f, 1), dequant)
    xf = x.to(torch.float32).contiguous()
    threads = _threads()
    if x.shape[0] <= INT8_MATVEC_TOKENS:
        y = torch.empty((x.shape[0], in_f if transpose else out_f), dtype=torch.float32)
        _check(CPU.int8_matvec(xf.data_ptr(), q, s, y.data_ptr(), x.shape[0], out_f, in_f, group_size,
                               int(transpose), threads), "int8_matmul")
        return y.to(x.dtype)

    def dequant(dst, r0, nr):
        _check(CPU.int8_dequantize_rows(q, s, dst.data_ptr(), r0, r0 + nr, in_f, group_size, threads), "int8_matmul")

    # ~4M values (16 MB) per block
    return _blocked_dequant_matmul(xf, out_f, in_f, transpose, (1 << 22) // max(in_f, 1), dequant).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# INT4 (weightkit/ops/int4.py)


def quantize_int4(x: Tensor, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """x contiguous. (packed uint8, scale fp32, zero uint8)."""
    xf = x.to(torch.float32).contiguous()
    n = xf.numel()
    groups = n // group_size
    packed = torch.empty((n // 2,), dtype=torch.uint8, device=x.device)
    scale = torch.empty((groups,), dtype=torch.float32, device=x.device)
    zero = torch.empty((groups,), dtype=torch.uint8, device=x.device)
    args = (xf.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), groups, group_size)
    if x.is_cuda:
        _check_cuda(CUDA.quantize_int4(*args, *_stream(x)), "quantize_int4")
    else:
        _check(CPU.quantize_int4(*args, _threads()), "quantize_int4")
    return packed, scale, zero


def _dequantize_int4_into(out: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, e0: int,
                          e1: int) -> None:
    """out (fp32, contiguous) <- the flat elements [e0, e1) of the dequantized matrix."""
    args = (packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), group_size, e0)
    if packed.is_cuda:
        _check_cuda(CUDA.dequantize_int4(*args, e1 - e0, *_stream(packed)), "dequantize_int4")
    else:
        _check(CPU.dequantize_int4(*args, e1, _threads()), "dequantize_int4")


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """packed, scale, zero contiguous. The flat fp32 values."""
    n = packed.numel() * 2
    out = torch.empty((n,), dtype=torch.float32, device=packed.device)
    _dequantize_int4_into(out, packed, scale, zero, group_size, 0, n)
    return out


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, rows: int, cols: int,
                transpose: bool) -> Tensor:
    """x: 2-D (any strides); packed, scale, zero contiguous. y = x W^T or x W, W = dequant (rows x cols)."""
    def dequant(dst, r0, nr):
        _dequantize_int4_into(dst, packed, scale, zero, group_size, r0 * cols, (r0 + nr) * cols)

    # ~4M values (16 MB) per block on CPU, up to 16M on a GPU
    block_rows = (1 << (24 if x.is_cuda else 22)) // max(cols, 1)
    return _blocked_dequant_matmul(x, rows, cols, transpose, block_rows, dequant)


# ---------------------------------------------------------------------------------------------------------------------
# GaLore (weightkit/ops/galore.py)


def low_rank_adam(low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                  eps: float) -> Tensor:
    """All contiguous fp32. M, V updated in place in one pass; returns U = M / (sqrt(V) + eps)."""
    update = torch.empty_like(low_grad)
    args = (low_grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), update.data_ptr(), low_grad.numel(),
            beta1, beta2, eps)
    if low_grad.is_cuda:
        _check_cuda(CUDA.low_rank_adam(*args, *_stream(low_grad)), "galore_adam_update_")
    else:
        _check(CPU.low_rank_adam(*args, _threads()), "galore_adam_update_")
    return update


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                        decay: float) -> None:
    """All contiguous and fp32 (weight included: weightkit.ops.galore writes other weights block by block). The
    kernel updates M, V and writes U in one pass; then W <- decay W - step_size scale decay (P U | U P): BLAS addmm_
    straight into W (no full-size temporary)."""
    update = low_rank_adam(low_grad, exp_avg, exp_avg_sq, beta1, beta2, eps)
    alpha = -step_size * scale * decay
    if left:
        weight.addmm_(ortho, update, beta=decay, alpha=alpha)
    else:
        weight.addmm_(update, ortho, beta=decay, alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------------
# MemoryFormer (weightkit/ops/memoryformer.py)


def memory_lookup_forward(x: Tensor, tables: Tensor, t: float) -> Tensor:
    """x: 2-D contiguous (n x K tau), tables contiguous (K x 2^tau x d_out). y (n x d_out) in x's dtype."""
    n = x.shape[0]
    k, buckets, d_out = tables.shape
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    args = (x.data_ptr(), FLOAT_CODES[x.dtype], tables.data_ptr(), FLOAT_CODES[tables.dtype], y.data_ptr(), n, k,
            buckets, d_out, buckets.bit_length() - 1, t)
    if x.is_cuda:
        _check_cuda(CUDA.memory_lookup_forward(*args, *_stream(x)), "memory_lookup_forward")
    else:
        _check(CPU.memory_lookup_forward(*args, _threads()), "memory_lookup_forward")
    return y


def memory_lookup_backward(grad: Tensor, x: Tensor, tables: Tensor, t: float,
                           deterministic: bool) -> Tuple[Tensor, Tensor]:
    """grad, x: 2-D contiguous; tables contiguous. (grad_x in x's dtype, grad_tables in tables' dtype). The CPU
    kernel is always deterministic (one thread per table, tokens in order); on CUDA, atomics unless
    ``deterministic``, then a stable torch.sort of the (table, bucket) keys and a segmented sum."""
    n = x.shape[0]
    k, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    xf, gf = x.to(torch.float32).contiguous(), grad.to(torch.float32).contiguous()
    tf = tables.to(torch.float32).contiguous()
    gx = torch.empty((n, k * tau), dtype=torch.float32, device=x.device)
    gt = torch.zeros((k, buckets, d_out), dtype=torch.float32, device=x.device)
    if not x.is_cuda:
        _check(CPU.memory_lookup_backward(gf.data_ptr(), xf.data_ptr(), tf.data_ptr(), gx.data_ptr(), gt.data_ptr(),
                                          n, k, buckets, d_out, tau, t, _threads()), "memory_lookup_backward")
        return gx.to(x.dtype), gt.to(tables.dtype)
    device, stream = _stream(x)
    keys = torch.empty((n, k), dtype=torch.int64, device=x.device)
    ps = torch.empty((n, k), dtype=torch.float32, device=x.device)
    if n > 0:
        _check_cuda(CUDA.memory_lookup_backward(gf.data_ptr(), xf.data_ptr(), tf.data_ptr(), gx.data_ptr(),
                                                gt.data_ptr(), keys.data_ptr(), ps.data_ptr(), n, k, buckets, d_out,
                                                tau, t, int(not deterministic), device, stream),
                    "memory_lookup_backward")
        if deterministic and k > 0 and d_out > 0:
            sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
            _check_cuda(CUDA.memory_segment_sum(sorted_keys.data_ptr(), order.data_ptr(), ps.data_ptr(),
                                                gf.data_ptr(), gt.data_ptr(), n * k, k, d_out, device, stream),
                        "memory_lookup_backward")
    return gx.to(x.dtype), gt.to(tables.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Dictionary gather (weightkit/ops/dictionary.py)

# From this many tokens the CPU forward works on z^T (axpys over contiguous tokens instead of gathers).
DICT_TRANSPOSED_TOKENS = 4


def dict_sparse_gather(z: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """z (n x k), values and indices (s x d_out): y (n x d_out) in z's dtype."""
    n, k = z.shape
    s, d_out = values.shape
    zf = z.to(torch.float32).contiguous()
    vf = values.to(torch.float32).contiguous()
    if z.is_cuda:
        idx = indices.to(torch.int64).contiguous()
        y = torch.empty((n, d_out), dtype=torch.float32, device=z.device)
        _check_cuda(CUDA.dict_gather_forward(zf.data_ptr(), vf.data_ptr(), idx.data_ptr(), y.data_ptr(), n, k, s,
                                             d_out, *_stream(z)), "dict_sparse_gather")
        return y.to(z.dtype)
    idx = indices.contiguous()
    code = INDEX_CODES[idx.dtype]
    if n >= DICT_TRANSPOSED_TOKENS:
        zt = zf.t().contiguous()
        yt = torch.empty((d_out, n), dtype=torch.float32)
        _check(CPU.dict_gather_forward_t(zt.data_ptr(), vf.data_ptr(), idx.data_ptr(), code, yt.data_ptr(), n, s,
                                         d_out, _threads()), "dict_sparse_gather")
        return yt.t().contiguous().to(z.dtype)
    y = torch.empty((n, d_out), dtype=torch.float32)
    _check(CPU.dict_gather_forward(zf.data_ptr(), vf.data_ptr(), idx.data_ptr(), code, y.data_ptr(), n, k, s, d_out,
                                   _threads()), "dict_sparse_gather")
    return y.to(z.dtype)


def dict_sparse_gather_backward(grad: Tensor, z: Tensor, values: Tensor, indices: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_z in z's dtype, grad_values in values' dtype). CPU: deterministic; CUDA: grad_z by atomics."""
    n, k = z.shape
    s, d_out = values.shape
    gf = grad.to(torch.float32).contiguous()
    zf = z.to(torch.float32).contiguous()
    vf = values.to(torch.float32).contiguous()
    idx = indices.to(torch.int64).contiguous()
    gz = torch.zeros((n, k), dtype=torch.float32, device=z.device)
    args = (gf.data_ptr(), zf.data_ptr(), vf.data_ptr(), idx.data_ptr(), gz.data_ptr())
    if z.is_cuda:
        gv = torch.empty((s, d_out), dtype=torch.float32, device=z.device)
        _check_cuda(CUDA.dict_gather_backward(*args, gv.data_ptr(), n, k, s, d_out, *_stream(z)),
                    "dict_sparse_gather_backward")
    else:
        gv = torch.zeros((s, d_out), dtype=torch.float32)
        _check(CPU.dict_gather_backward(*args, gv.data_ptr(), n, k, s, d_out, _threads()),
               "dict_sparse_gather_backward")
    return gz.to(z.dtype), gv.to(values.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Dictionary matmul, S in the bitmask format (weightkit/ops/dictionary.py), CPU only

# Up to this many tokens the CPU kernels read the bitmask directly; beyond, S^T is decoded to a dense fp32 matrix
# (d_out x k, in blocks of DICT_BITMASK_DENSE_BLOCK values) per call and torch's BLAS multiplies (backward: grad_z =
# grad S^T, and grad S^T = grad^T z gathered at S's nonzeros). Measured at 1024 x 1024, k = 464, s = 232 (ratio 0.3),
# 2 threads, best of 5, two runs on an idle 2-core VM, 2026-11-26 (ms at 1 / 2 / 3 / 4 / 5 / 8 tokens): forward direct
# 0.20 / 0.23 / 0.26 / 0.30 / 0.32-0.34 / 0.40-0.41 vs dense 0.22 / 0.26 / 0.28-0.34 / 0.29-0.33 / 0.28-0.36 /
# 0.29-0.34; backward direct 0.29 / 0.40 / 0.50-0.51 / 0.63 / 0.73-0.75 / 1.03-1.06 vs dense 0.48 / 0.56-0.58 /
# 0.78-0.83 / 0.59-0.83 / 0.58-0.74 / 0.72-0.83. Both paths cost about k d_out per call, plus s d_out (direct) or
# k d_out (BLAS) per token, so at DictLinear's s ~ k / 2 the crossover does not move with the layer's size.
DICT_BITMASK_DIRECT_TOKENS = 4
_OFFSET_CODES = {torch.uint8: 3, torch.int16: 4, torch.int32: 5}


# The dense path decodes at most this many values of S^T at a time (16 MB of fp32), so a large layer's S never
# exists whole in fp32.
DICT_BITMASK_DENSE_BLOCK = 1 << 22


def _bitmask_blocks(k: int, d_out: int):
    step = max(1, min(d_out, DICT_BITMASK_DENSE_BLOCK // max(k, 1)))
    return [(c0, min(d_out, c0 + step)) for c0 in range(0, d_out, step)], step


def _bitmask_decode(buf: Tensor, values: Tensor, bitmask: Tensor, offsets: Tensor, c0: int, c1: int) -> Tensor:
    """Columns [c0, c1) of S as the rows of buf[:c1 - c0] (fp32, dense), returned."""
    s, d_out = values.shape
    k = buf.shape[1]
    _check(CPU.dict_bitmask_to_dense_t(values.data_ptr(), FLOAT_CODES[values.dtype], bitmask.data_ptr(),
                                       offsets.data_ptr(), _OFFSET_CODES[offsets.dtype], buf.data_ptr(), k, s, d_out,
                                       c0, c1, _threads()), "dict_bitmask_matmul")
    return buf[:c1 - c0]


def dict_bitmask_matmul(z: Tensor, values: Tensor, bitmask: Tensor, offsets: Tensor) -> Tensor:
    """CPU. z (n x k), values (s x d_out), bitmask and offsets (W x d_out), all contiguous: y = z S in z's dtype."""
    n, k = z.shape
    s, d_out = values.shape
    if n > DICT_BITMASK_DIRECT_TOKENS:
        zf = z.to(torch.float32)
        blocks, step = _bitmask_blocks(k, d_out)
        buf = torch.empty((step, k), dtype=torch.float32)
        if len(blocks) == 1:
            y = torch.mm(zf, _bitmask_decode(buf, values, bitmask, offsets, 0, d_out).t())
        else:  # Y^T block by block (contiguous row ranges that BLAS writes in place), one transpose at the end
            yt = torch.empty((d_out, n), dtype=torch.float32)
            for c0, c1 in blocks:
                torch.mm(_bitmask_decode(buf, values, bitmask, offsets, c0, c1), zf.t(), out=yt[c0:c1])
            y = yt.t().contiguous()
        return y if y.dtype == z.dtype else y.to(z.dtype)
    y = torch.empty((n, d_out), dtype=z.dtype)
    _check(CPU.dict_bitmask_forward(z.data_ptr(), FLOAT_CODES[z.dtype], values.data_ptr(), FLOAT_CODES[values.dtype],
                                    bitmask.data_ptr(), offsets.data_ptr(), _OFFSET_CODES[offsets.dtype], y.data_ptr(),
                                    n, k, s, d_out, _threads()), "dict_bitmask_matmul")
    return y


def dict_bitmask_matmul_backward(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor,
                                 offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """CPU, all contiguous. (grad_z in z's dtype, grad_values in values' dtype); deterministic."""
    n, k = z.shape
    s, d_out = values.shape
    if n > DICT_BITMASK_DIRECT_TOKENS:
        gf, zf = grad.to(torch.float32), z.to(torch.float32)
        blocks, step = _bitmask_blocks(k, d_out)
        buf = torch.empty((step, k), dtype=torch.float32)
        grad_z = torch.zeros((n, k), dtype=torch.float32) if len(blocks) > 1 else None
        grad_values = torch.empty(values.shape, dtype=values.dtype)
        for c0, c1 in blocks:  # grad_z: the blocks' products added in order (deterministic)
            g_block = gf[:, c0:c1]
            s_t = _bitmask_decode(buf, values, bitmask, offsets, c0, c1)
            if grad_z is None:
                grad_z = torch.mm(g_block, s_t)
            else:
                grad_z.addmm_(g_block, s_t)
            grad_s_t = torch.mm(g_block.t(), zf, out=buf[:c1 - c0])  # columns [c0, c1) of grad S, as rows
            _check(CPU.dict_bitmask_gather_dense_t(grad_s_t.data_ptr(), bitmask.data_ptr(), offsets.data_ptr(),
                                                   _OFFSET_CODES[offsets.dtype], grad_values.data_ptr(),
                                                   FLOAT_CODES[values.dtype], k, s, d_out, c0, c1, _threads()),
                   "dict_bitmask_matmul_backward")
        return (grad_z if grad_z.dtype == z.dtype else grad_z.to(z.dtype)), grad_values
    zc, g = z, grad
    if grad.dtype != z.dtype:  # one dtype for both in the kernel: fp32, which holds either exactly
        zc, g = z.to(torch.float32), grad.to(torch.float32)
    grad_z = torch.empty((n, k), dtype=zc.dtype)
    grad_values = torch.empty(values.shape, dtype=values.dtype)
    _check(CPU.dict_bitmask_backward(g.data_ptr(), zc.data_ptr(), FLOAT_CODES[zc.dtype], values.data_ptr(),
                                     FLOAT_CODES[values.dtype], bitmask.data_ptr(), offsets.data_ptr(),
                                     _OFFSET_CODES[offsets.dtype], grad_z.data_ptr(), grad_values.data_ptr(), n, k,
                                     s, d_out, _threads()), "dict_bitmask_matmul_backward")
    return (grad_z if grad_z.dtype == z.dtype else grad_z.to(z.dtype)), grad_values
