"""A pruned Linear: N:M weights in the compressed layout (values + positions), or unstructured as a dense
weight with zeros."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.layers.base import _QuantLinear, _as_dtype, _linear_weight
from lowbit.kernels.nm_layout import compress_nm, decompress_nm, is_nm


class SparseLinear(_QuantLinear):
    """Buffers with n:m > 0: values [out, in n/m] in dtype and index uint8 [out, in n/m] (each value's
    position within its group of m, lowbit.kernels.nm_layout); with n = m = 0: weight [out, in]
    (unstructured, zeros stored); bias [out]."""

    kind = "sparse"

    def __init__(self, in_features: int, out_features: int, n: int = 0, m: int = 0, bias: bool = True,
                 dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if not (n == m == 0 or (0 < n < m and in_features % m == 0)):
            raise LowbitError(f"sparse layer: expected n = m = 0 or 0 < n < m with in_features={in_features} "
                              f"a multiple of m, got n={n}, m={m}")
        self.n, self.m = int(n), int(m)
        kw = dict(dtype=self._dtype, device=device)
        if self.m:
            k = in_features * self.n // self.m
            self.register_buffer("values", torch.empty(out_features, k, **kw))
            self.register_buffer("index", torch.empty(out_features, k, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, **kw))

    _keep_dtype = ("index",)

    @classmethod
    def from_weight(cls, W: torch.Tensor, n: int = 0, m: int = 0, bias=None, dtype=torch.float16) -> "SparseLinear":
        """W [out, in] already pruned (to at most n of every m with m > 0) -> the layer, W rounded to dtype."""
        dtype = _as_dtype(dtype)
        out, k = W.shape
        layer = cls(k, out, n, m, bias=bias is not None, dtype=dtype, device=W.device)
        W = W.detach().to(dtype)
        if m:
            if not is_nm(W, n, m):
                raise LowbitError(f"sparse layer: the weight is not {n}:{m} sparse")
            values, index = compress_nm(W, n, m)
            layer._load("values", values)
            layer._load("index", index)
        else:
            layer._load("weight", W)
        layer._load_optional(bias=bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, keep: torch.Tensor, n: int = 0, m: int = 0,
                    dtype=torch.float16) -> "SparseLinear":
        """linear's weight with the mask keep (bool [out, in], True = kept) applied."""
        return cls.from_weight(_linear_weight(linear) * keep, n, m, linear.bias, dtype)

    def check_loaded(self) -> None:
        super().check_loaded()
        if self.m and not self.index.is_meta and bool((self.index >= self.m).any()):
            raise LowbitError(f"index holds positions >= m={self.m}")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] with its zeros."""
        w = decompress_nm(self.values, self.index, self.n, self.m) if self.m else self.weight
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.n == 2 and self.m == 4 and x.is_cuda:
            from lowbit.kernels.semi_structured import semi_structured_linear, semi_structured_ok
            if semi_structured_ok(self.values, x.dtype):
                return semi_structured_linear(x, self._semi_structured(x.dtype), b)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def _semi_structured(self, dtype: torch.dtype):
        """The weight compressed for sparse tensor cores, built once per dtype and device (the buffers are
        the checkpoint's truth; this is a cache of them)."""
        from lowbit.kernels.semi_structured import to_semi_structured
        key = (dtype, self.values.device, self.values.data_ptr())
        if getattr(self, "_semi_key", None) != key:
            self._semi = to_semi_structured(self.dequantized_weight(dtype), dtype)
            self._semi_key = key
        return self._semi

    def _options(self):
        return {"n": self.n, "m": self.m}
