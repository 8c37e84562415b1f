"""DictLinear: a linear layer whose weight is a dense dictionary times column-sparse codes (CoSpaDi).

With nn.Linear's convention y = x W^T, W^T (in x out) = D S: ``dictionary`` D (in x k, a Parameter that several
layers may share), and S (k x out) with exactly s nonzeros per column stored as ``values`` (s x out, a Parameter)
and ``indices`` (s x out, a buffer: uint8 when k <= 256, int16 when k <= 32768). Forward: Z = x D (dense matmul),
then ``weightkit::dict_sparse_gather``. Training updates D and values; indices stay frozen.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.dictionary import dict_sparse_gather, index_dtype_for
from .ksvd import dictionary_size, learn_dictionary


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
        self.values = nn.Parameter(torch.randn(s, out_features, device=device, dtype=dtype) / math.sqrt(s))
        atoms = torch.rand(k, out_features, device=device).argsort(0)[:s]  # s distinct atoms per column
        self.register_buffer("indices", atoms.to(index_dtype_for(k)))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, dictionary: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None) -> "DictLinear":
        """Build from D (in x k; an nn.Parameter is shared, not copied), values and indices (s x out), bias."""
        if dictionary.dim() != 2 or values.dim() != 2 or values.shape != indices.shape:
            raise ValueError(f"need dictionary (in x k) and values/indices (s x out) of one shape, got "
                             f"{tuple(dictionary.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}")
        (d_in, k), (s, d_out) = dictionary.shape, values.shape
        if int(indices.min()) < 0 or int(indices.max()) >= k:
            raise ValueError(f"indices must lie in [0, k={k})")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.k, layer.s = d_in, d_out, k, s
        layer.dictionary = dictionary if isinstance(dictionary, nn.Parameter) else nn.Parameter(dictionary.detach().clone())
        layer.values = nn.Parameter(values.detach().clone().to(layer.dictionary.dtype))
        layer.register_buffer("indices", indices.detach().to(index_dtype_for(k)).clone())
        layer.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, ratio: float = 0.3, k_over_s: float = 2.0, iters: int = 3) -> "DictLinear":
        """Data-free factorization of ``linear`` (K-SVD on W^T) removing ``ratio`` of the weight's bytes. For the
        calibration-guided version use weightkit.compress.dictionary."""
        w = linear.weight.detach()
        k, s = dictionary_size(linear.in_features, linear.out_features, ratio, k_over_s, w.dtype.itemsize)
        D, idx, coef, _ = learn_dictionary(w.T.to(torch.float64), k, s, iters=iters)
        return cls.from_factors(nn.Parameter(D.to(w.dtype)), coef.T.contiguous().to(w.dtype), idx.T.contiguous(),
                                linear.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the indices buffer is narrow (uint8 for k <= 256): a silent cast of wider indices would wrap around
        idx = state_dict.get(prefix + "indices")
        if idx is not None:
            k = self.dictionary.shape[1]
            if idx.is_floating_point() or idx.is_complex() or tuple(idx.shape) != tuple(self.indices.shape):
                raise ValueError(f"{prefix}indices must be an integer tensor of shape {tuple(self.indices.shape)}, got "
                                 f"{idx.dtype} {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
                raise ValueError(f"{prefix}indices hold values in [{int(idx.min())}, {int(idx.max())}], outside the "
                                 f"k={k} atoms of this layer's dictionary")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def stored_bytes(self) -> int:
        """Bytes of dictionary, values, indices and bias (what is stored; index bytes included)."""
        tensors = [self.dictionary, self.values, self.indices] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def compression_ratio(self) -> float:
        """Fraction of the dense layer's bytes (weight + bias, same dtype) removed."""
        dense = (self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)) * \
            self.values.element_size()
        return 1.0 - self.stored_bytes() / dense

    def dense_weight(self) -> Tensor:
        """W (out x in) = (D S)^T, for checks."""
        S = torch.zeros(self.k, self.out_features, dtype=self.values.dtype, device=self.values.device)
        S.scatter_(0, self.indices.long(), self.values.detach())
        return (self.dictionary.detach() @ S).T

    def forward(self, x: Tensor) -> Tensor:
        # per call ~1 us saved each: nn.Module's dicts read directly (its __getattr__ costs ~0.4 us per tensor), no
        # no-op .to(dtype), no reshape of 2-D input
        params, dtype = self._parameters, x.dtype
        dictionary = params["dictionary"] if "dictionary" in params else self.dictionary
        values = params["values"] if "values" in params else self.values
        indices = self._buffers["indices"] if "indices" in self._buffers else self.indices
        bias = params["bias"] if "bias" in params else self.bias
        if dictionary.dtype != dtype:
            dictionary = dictionary.to(dtype)
        if values.dtype != dtype:
            values = values.to(dtype)
        if x.dim() == 2:
            y = dict_sparse_gather(x @ dictionary, values, indices)
        else:
            z = x.reshape(-1, self.in_features) @ dictionary
            y = dict_sparse_gather(z, values, indices).reshape(*x.shape[:-1], self.out_features)
        if bias is None:
            return y
        if bias.dtype != y.dtype:
            bias = bias.to(y.dtype)
        return y + bias if torch.is_grad_enabled() else y.add_(bias)  # without autograd, into the fresh output

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
                f"compression={self.compression_ratio():.1%}")
