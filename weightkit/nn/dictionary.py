"""DictLinear: a linear layer whose weight is a dense dictionary times column-sparse codes (CoSpaDi).

With nn.Linear's convention y = x W^T, W^T (in x out) = D S: ``dictionary`` D (in x k, a Parameter that several
layers may share), and S (k x out) with exactly s nonzeros per column in CoSpaDi's bitmask format (see
weightkit.ops.dictionary): ``bitmask`` (int32 (ceil(k/32), out), a buffer: which atoms each column uses),
``values`` (s x out, a Parameter: each column's nonzeros in ascending atom order) and ``word_offsets`` (a buffer
derived from the bitmask, not saved in the state_dict: each column's nonzeros before each word, for the kernels).
Forward: Z = x D (dense matmul), then ``weightkit::dict_bitmask_matmul`` (y = Z S). Training updates D and values;
the bitmask stays frozen. ``stored_bytes()`` counts all of them.

State dicts of the former layout (ELL: ``values`` in any atom order + ``indices`` s x out) still load: they are
converted to the bitmask format when loaded.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops._checks import FLOAT_DTYPES
from ..ops.dictionary import (INDEX_DTYPES, bitmask_to_dense, bitmask_to_indices, bitmask_words, check_bitmask_data,
                              dict_bitmask_matmul, pack_bitmask, word_offsets_for)
from ._bias import add_bias
from .ksvd import check_int, check_k_over_s, check_ratio, dictionary_size, learn_dictionary


class DictLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, k: int, s: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("k", k), ("s", s)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if s > k:
            raise ValueError(f"s={s} nonzeros per column cannot exceed k={k} atoms")
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.dictionary = nn.Parameter(torch.randn(in_features, k, device=device, dtype=dtype) / math.sqrt(in_features))
        atoms = torch.rand(k, out_features, device=device).argsort(0)[:s]  # s distinct atoms per column
        values = torch.randn(s, out_features, device=device, dtype=dtype) / math.sqrt(s)
        self._set_codes(values, atoms)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def _set_codes(self, values: Tensor, indices: Tensor) -> None:
        bitmask, values, offsets = pack_bitmask(indices, values.detach(), self.k)
        self.values = nn.Parameter(values.clone())
        self.register_buffer("bitmask", bitmask)
        self.register_buffer("word_offsets", offsets, persistent=False)

    @classmethod
    def from_factors(cls, dictionary: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None) -> "DictLinear":
        """Build from D (in x k; an nn.Parameter is shared, not copied), S as values and indices (s x out: column j
        uses the s distinct atoms indices[:, j], in any order, with coefficients values[:, j]), and bias."""
        if dictionary.dim() != 2 or values.dim() != 2 or values.shape != indices.shape:
            raise ValueError(f"need dictionary (in x k) and values/indices (s x out) of one shape, got "
                             f"{tuple(dictionary.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}")
        (d_in, k), (s, d_out) = dictionary.shape, values.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.k, layer.s = d_in, d_out, k, s
        layer.dictionary = dictionary if isinstance(dictionary, nn.Parameter) else nn.Parameter(dictionary.detach().clone())
        layer._set_codes(values.to(layer.dictionary.dtype), indices)
        layer.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return layer

    @staticmethod
    def check_options(ratio: float = 0.3, k_over_s: float = 2.0, iters: int = 3) -> None:
        """Check the options of :meth:`from_linear` that do not depend on a layer's shape (weightkit.swap checks
        them once, before it replaces any layer); raises ValueError naming the option."""
        check_ratio(ratio)
        check_k_over_s(k_over_s)
        check_int("iters", iters, 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio: float = 0.3, k_over_s: float = 2.0, iters: int = 3) -> "DictLinear":
        """Data-free factorization of ``linear`` (K-SVD on W^T) removing ``ratio`` of the weight's bytes (the exact
        bytes of the bitmask format). For the calibration-guided version use weightkit.compress.dictionary.
        (dictionary_size and learn_dictionary check the options as check_options does.)"""
        w = linear.weight.detach()
        k, s = dictionary_size(linear.in_features, linear.out_features, ratio, k_over_s, w.dtype.itemsize)
        D, idx, coef, _ = learn_dictionary(w.T.to(torch.float64), k, s, iters=iters)
        return cls.from_factors(nn.Parameter(D.to(w.dtype)), coef.T.contiguous().to(w.dtype), idx.T.contiguous(),
                                linear.bias)

    @property
    def indices(self) -> Tensor:
        """S's atoms as ELL indices (s x out, int64, ascending in each column: row r belongs to values[r]); computed
        from the bitmask, read-only."""
        return bitmask_to_indices(self.bitmask, self.k, self.s)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shape = (bitmask_words(self.k), self.out_features)
        idx = state_dict.pop(prefix + "indices", None)
        if idx is not None:  # the former ELL layout: convert (values are reordered by atom)
            values = state_dict.get(prefix + "values")
            if idx.is_floating_point() or idx.is_complex() or idx.dtype not in INDEX_DTYPES or \
                    tuple(idx.shape) != (self.s, self.out_features):
                raise ValueError(f"{prefix}indices (a state_dict of the former ELL layout) must be an integer tensor "
                                 f"of shape {(self.s, self.out_features)}, got {idx.dtype} {tuple(idx.shape)}")
            if values is None or tuple(values.shape) != tuple(idx.shape):
                raise ValueError(f"{prefix}indices (the former ELL layout) need {prefix}values of the same shape "
                                 f"{tuple(idx.shape)}, got {None if values is None else tuple(values.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.k):
                raise ValueError(f"{prefix}indices hold values in [{int(idx.min())}, {int(idx.max())}], outside the "
                                 f"k={self.k} atoms of this layer's dictionary")
            bitmask, values, _ = pack_bitmask(idx, values, self.k)
            state_dict[prefix + "values"], state_dict[prefix + "bitmask"] = values, bitmask
        bitmask = state_dict.get(prefix + "bitmask")
        if bitmask is not None:
            if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != shape:
                raise ValueError(f"{prefix}bitmask must be an int32 tensor of shape {shape}, got {bitmask.dtype} "
                                 f"{tuple(bitmask.shape)}")
            check_bitmask_data(bitmask, self.k, self.s, name=f"{prefix}bitmask")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if bitmask is not None and not error_msgs:
            self.word_offsets = word_offsets_for(self.bitmask, self.s)

    def stored_bytes(self) -> int:
        """Bytes of dictionary, values, bitmask, word offsets and bias (all that is stored)."""
        tensors = [self.dictionary, self.values, self.bitmask, self.word_offsets] + \
            ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def compression_ratio(self) -> float:
        """Fraction of the dense layer's bytes (weight + bias, same dtype) removed."""
        dense = (self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)) * \
            self.values.element_size()
        return 1.0 - self.stored_bytes() / dense

    def dense_weight(self) -> Tensor:
        """W (out x in) = (D S)^T, for checks."""
        return (self.dictionary.detach() @ bitmask_to_dense(self.bitmask, self.values.detach(), self.k)).T

    def forward(self, x: Tensor) -> Tensor:
        # per call ~1 us saved each: nn.Module's dicts read directly (its __getattr__ costs ~0.4 us per tensor), no
        # no-op .to(dtype), no reshape of 2-D input
        params, buffers, dtype = self._parameters, self._buffers, x.dtype
        dictionary = params["dictionary"] if "dictionary" in params else self.dictionary
        values = params["values"] if "values" in params else self.values
        bitmask = buffers["bitmask"] if "bitmask" in buffers else self.bitmask
        offsets = buffers["word_offsets"] if "word_offsets" in buffers else self.word_offsets
        bias = params["bias"] if "bias" in params else self.bias
        try:
            if dictionary.dtype != dtype:
                dictionary = dictionary.to(dtype)
            if values.dtype != dtype:
                values = values.to(dtype)
            if x.dim() == 2:
                y = dict_bitmask_matmul(x @ dictionary, values, bitmask, offsets)
            else:
                z = x.reshape(-1, self.in_features) @ dictionary
                y = dict_bitmask_matmul(z, values, bitmask, offsets).reshape(*x.shape[:-1], self.out_features)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            # Checked only on failure (no cost per call): torch's matmul error or the op's, which names its internal
            # z = x D, become one that names the layer's input.
            problem = self._input_error(x, dictionary)
            if problem is None:
                raise
            raise problem from exc
        return add_bias(y, bias)

    def _input_error(self, x, dictionary: Tensor) -> Optional[Exception]:
        """What is wrong with the forward's input ``x``, in the user's terms (None: nothing found)."""
        if not isinstance(x, Tensor):
            return TypeError(f"DictLinear input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            return TypeError(f"DictLinear input must have dtype float32, float16 or bfloat16, got "
                             f"{str(x.dtype).replace('torch.', '')}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            return ValueError(f"DictLinear input has {x.shape[-1] if x.dim() else 0} features in its last dimension "
                              f"(shape {tuple(x.shape)}), but the layer takes in_features={self.in_features}")
        if x.device != dictionary.device:
            return ValueError(f"DictLinear input is on {x.device} but the layer's parameters are on "
                              f"{dictionary.device}")
        if not bool(torch.isfinite(x).all()):
            return ValueError("DictLinear input contains non-finite values (NaN or Inf)")
        if not bool(torch.isfinite(dictionary).all()):
            return ValueError("DictLinear dictionary contains non-finite values (NaN or Inf)")
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
                f"compression={self.compression_ratio():.1%}")
