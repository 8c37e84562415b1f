"""Part (b) of the GaLore step: how Adam's two moments are stored (low-rank for GaLore parameters, full size for
the others).

The step reads the moments as float32 tensors, updates them in place (the fused GaLore kernel, or plain ops), and
hands them back for storage:

* :class:`FloatMoments` -- ``exp_avg`` / ``exp_avg_sq`` in float32; ``load`` returns the state's own tensors and
  ``store`` has nothing to do.
* :class:`BlockwiseMoments8bit` -- bitsandbytes' blockwise dynamic quantization (blocks of 256, the signed map for
  the first moment, the unsigned one for the second): ``exp_avg_q`` / ``exp_avg_absmax``, ``exp_avg_sq_q`` /
  ``exp_avg_sq_absmax`` and the shape ``moment_shape`` (int64, on the CPU: read on the host every step without a
  device sync). ``load`` dequantizes into float32 temporaries of the moment's size, ``store`` quantizes them back.
  Moments of fewer than ``min_8bit_size`` elements stay float32 (the FloatMoments entries).
* :class:`FusedBlockwiseMoments8bit` (GaLoreAdamW8bit, QGaLoreAdamW8bit and the sharded 8-bit preset) -- the same
  entries and format, updated in one pass by ``weightkit::blockwise8bit_adam_`` (read 8-bit, update, write 8-bit;
  no float32 copy of a moment), which also gives the step its Adam direction (``adam_direction_``; the weight part
  writes it back: ``apply_direction``). Its quantizer takes the nearest code value, where bitsandbytes' native CPU
  quantizer differs on a few values (weightkit.ops.moments8bit): either reads the other's state. The low-rank
  moments only: a dense parameter's moments (``dense_blocks``) go through float32 a block at a time.

The entry names are the checkpoint format: they do not change.

Parameters outside the GaLore groups (embeddings, norms, biases) are stepped by AdamW at full size, through
``dense_blocks``: flat blocks of at most ``DENSE_BLOCK`` values, the moments of a block as float32 (the state's own
tensors, or dequantized copies of that block that go back to 8 bits after it), so that no float32 temporary of the
parameter's size exists (a 32000 x 4096 embedding: 131M values, 0.5 GB a float32 copy).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..backends._blocked import keep_unless_found
from ..ops.moments8bit import blockwise8bit_adam_
from .basis import _check_sizes, host_shape


DENSE_BLOCK = 1 << 22  # values per block of a dense parameter's AdamW step (16 MiB of float32)


def blocks_of(*tensors, size: int):
    """Matching blocks of at most ``size`` elements of same-shaped tensors (flat views), or the tensors whole when
    one of them is not contiguous."""
    if not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), size):
        yield tuple(f[start:start + size] for f in flat)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class FloatMoments:
    """float32 moments, updated in place."""

    keys = ("exp_avg", "exp_avg_sq")
    host_keys = ()

    def init(self, state: Dict, like: Tensor) -> None:
        state["exp_avg"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def has(self, state: Dict) -> bool:
        return "exp_avg" in state

    def load(self, state: Dict) -> Tuple[Tensor, Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    def store(self, state: Dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        pass  # updated in place

    def dense_blocks(self, state: Dict, tensors, found_inf: Optional[Tensor] = None):
        """Blocks of ``tensors`` (the parameter, its gradient: the moments' shape) with the matching blocks of the
        two moments as float32 tensors that the caller updates in place (see the module docstring). ``found_inf``:
        the step's device flag, where set the caller keeps the old moment values (a predicated step)."""
        yield from blocks_of(*tensors, state["exp_avg"], state["exp_avg_sq"], size=DENSE_BLOCK)

    def validate(self, where: str, state: Dict, shape: tuple) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: saved {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# Loggers that report, at bitsandbytes' import, its attempt to fetch an optional CPU 4-bit GEMM from the Hugging Face
# Hub (through the ``kernels`` package): offline or untrusted, it logs a warning on every process start. weightkit
# uses only bitsandbytes' blockwise quantization, so that attempt is noise to its users; silenced during the import.
_BNB_IMPORT_LOGGERS = ("bitsandbytes", "kernels")


_BNBF = None  # bitsandbytes.functional once imported (the import silences loggers; see _bnb)


def _bnb():
    """bitsandbytes.functional, or an ImportError that says how to get it. Imported once: each later call returns
    the module (the steps call this for every parameter, and setting a logger's level clears the cache of every
    logger of the process: with the 423 loggers of `import weightkit.train` the 4 per call cost 71 us, 2 calls per
    Q-GaLore matrix per step)."""
    global _BNBF
    if _BNBF is not None:
        return _BNBF
    import logging

    loggers = [logging.getLogger(name) for name in _BNB_IMPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbf
    except ImportError as exc:
        raise ImportError("8-bit optimizer moments (GaLoreAdamW8bit, QGaLoreAdamW8bit) need bitsandbytes: "
                          f"pip install 'weightkit[bnb]' (or bitsandbytes>=0.50); import failed: {exc}") from exc
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    _BNBF = bnbf
    return bnbf


class BlockwiseMoments8bit(FloatMoments):
    """8-bit blockwise moments (bitsandbytes), float32 below ``min_8bit_size`` elements."""

    BLOCK = 256
    keys = FloatMoments.keys + ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax", "moment_shape")
    host_keys = ("moment_shape",)

    def __init__(self, min_8bit_size: int = 4096):
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        self._codes: Dict = {}
        _bnb()  # at construction: fail when the optimizer is built, not at its first step

    def _code(self, signed: bool, device) -> Tensor:
        key = (signed, device)
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = _bnb().create_dynamic_map(signed=signed).to(device)
        return code

    def quantize(self, x: Tensor, signed: bool) -> Tuple[Tensor, Tensor]:
        """(uint8 codes, float32 absmax per block of 256) of ``x``."""
        bnbf = _bnb()
        q, qs = bnbf.quantize_blockwise(x, code=self._code(signed, x.device), blocksize=self.BLOCK)
        return q, qs.absmax

    def dequantize(self, q: Tensor, absmax: Tensor, signed: bool, shape) -> Tensor:
        bnbf = _bnb()
        out = bnbf.dequantize_blockwise(q, absmax=absmax, code=self._code(signed, q.device), blocksize=self.BLOCK)
        return out.reshape(shape).to(torch.float32)

    def init(self, state: Dict, like: Tensor) -> None:
        if like.numel() < self.min_8bit_size:
            return super().init(state, like)
        # zeros quantized: one block's codes and absmax repeated (no float32 zeros of the moment's size)
        blocks = -(-like.numel() // self.BLOCK)
        zeros = torch.zeros(self.BLOCK, dtype=torch.float32, device=like.device)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            q, absmax = self.quantize(zeros, signed)
            state[key + "_q"] = q[0].expand(like.shape).clone(memory_format=torch.contiguous_format)
            state[key + "_absmax"] = absmax[0].expand(blocks).clone(memory_format=torch.contiguous_format)
        state["moment_shape"] = torch.tensor(list(like.shape), dtype=torch.int64, device="cpu")

    def has(self, state: Dict) -> bool:
        return "exp_avg" in state or "exp_avg_q" in state

    def load(self, state: Dict) -> Tuple[Tensor, Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        shape = host_shape(state, "moment_shape")
        return (self.dequantize(state["exp_avg_q"], state["exp_avg_absmax"], True, shape),
                self.dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False, shape))

    def store(self, state: Dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        if "exp_avg" in state:
            return
        state["exp_avg_q"], state["exp_avg_absmax"] = self.quantize(exp_avg, True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self.quantize(exp_avg_sq, False)

    def dense_blocks(self, state: Dict, tensors, found_inf: Optional[Tensor] = None):
        """FloatMoments.dense_blocks for 8-bit moments: each block's moments are dequantized into float32
        temporaries of the block's size, and quantized back into the block's codes and absmax entries once the
        caller has updated them (blocks are whole quantization blocks of 256, so the codes are those of the
        whole-tensor quantization, bit for bit). Where ``found_inf`` is set the codes and absmax entries keep their
        old values (quantizing dequantized values need not give back the same codes)."""
        if "exp_avg" in state:
            yield from super().dense_blocks(state, tensors, found_inf)
            return
        shape = host_shape(state, "moment_shape")
        numel = _numel(shape)
        size = max(self.BLOCK, DENSE_BLOCK // self.BLOCK * self.BLOCK)
        whole = not all(t.is_contiguous() for t in tensors)
        if whole:
            size = max(numel, 1)
        flat = [t.view(-1) for t in tensors] if not whole else list(tensors)
        for key in ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"):
            if not state[key].is_contiguous():  # (a state put together by hand): the blocks are flat views
                state[key] = state[key].contiguous()
        stored = ((state["exp_avg_q"].view(-1), state["exp_avg_absmax"].view(-1), True),
                  (state["exp_avg_sq_q"].view(-1), state["exp_avg_sq_absmax"].view(-1), False))
        for start in range(0, numel, size):
            end = min(numel, start + size)
            blocks = [(q[start:end], absmax[start // self.BLOCK:-(-end // self.BLOCK)], signed)
                      for q, absmax, signed in stored]
            moments = [self.dequantize(q, absmax, signed, shape if whole else (end - start,))
                       for q, absmax, signed in blocks]
            yield (*(t if whole else t[start:end] for t in flat), *moments)
            for (q, absmax, signed), x in zip(blocks, moments):
                new_q, new_absmax = self.quantize(x.reshape(-1), signed)  # (bitsandbytes' out= is deprecated)
                keep_unless_found(q, new_q, found_inf)
                keep_unless_found(absmax, new_absmax, found_inf)

    def validate(self, where: str, state: Dict, shape: tuple) -> None:
        super().validate(where, state, shape)
        if "exp_avg_q" not in state:
            return
        saved = tuple(state["moment_shape"].tolist()) if isinstance(state.get("moment_shape"), Tensor) else None
        if saved != tuple(shape):
            raise ValueError(f"{where}: saved moment_shape {saved} does not match the expected {tuple(shape)}")
        numel = _numel(shape)
        blocks = -(-numel // self.BLOCK)
        _check_sizes(where, state, (("exp_avg_q", numel), ("exp_avg_sq_q", numel), ("exp_avg_absmax", blocks),
                                    ("exp_avg_sq_absmax", blocks)))


class FusedBlockwiseMoments8bit(BlockwiseMoments8bit):
    """BlockwiseMoments8bit updated in one pass (see the module docstring)."""

    def adam_direction_(self, state: Dict, low: Tensor, u) -> Optional[Tensor]:
        """Update the 8-bit moments with ``low`` in place and return M / (sqrt(V) + eps); None for moments kept in
        float32 (below ``min_8bit_size``: the step updates those itself)."""
        if "exp_avg_q" not in state:
            return None
        return blockwise8bit_adam_(low.to(torch.float32), state["exp_avg_q"], state["exp_avg_absmax"],
                                   state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], self._code(True, low.device),
                                   self._code(False, low.device), beta1=u.beta1, beta2=u.beta2, eps=u.eps,
                                   found_inf=u.found_inf)
