"""W8A8 int8: per-channel int8 weights x per-token dynamic (or static) int8 activations, int32 sums."""
from __future__ import annotations


import torch
import torch.nn as nn

from lowbit.kernels import use_kernels
from lowbit.kernels.int8_matmul import (INT8_SYM, int8_mm, quantize_act_int8)
from lowbit.kernels.primitives import (quantize_groups)


from lowbit.layers.base import (_QuantLinear, _linear_weight)


# ----------------------------------------------------------------------------- W8A8

class Int8Linear(_QuantLinear):
    """W8A8 int8 linear. Buffers: qweight int8 [out, in], w_scale float32 [out, 1], act_scale
    float32 [1] when static_act (else per-token dynamic), bias [out]. Output in the input's dtype."""

    kind = "int8"
    _keep_dtype = ("w_scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, static_act: bool = False, bias: bool = True,
                 dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.static_act = bool(static_act)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, act_scale=None, dtype=None) -> "Int8Linear":
        """act_scale: static activation step (calibrated absmax / 127), or None for per-token dynamic.
        dtype: bias storage (default: linear's dtype)."""
        w = _linear_weight(linear)  # [out, in]
        q, s, _ = quantize_groups(w, INT8_SYM)  # q [out, in], s [out, 1, 1]
        layer = cls(w.shape[1], w.shape[0], static_act=act_scale is not None, bias=linear.bias is not None,
                    dtype=dtype or linear.weight.dtype, device=w.device)
        layer.qweight = q
        layer._load("w_scale", s)
        layer._load_optional(act_scale=act_scale, bias=linear.bias)
        return layer

    def int_accumulate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., in] -> (exact int32 sums [M, out], activation scale [M, 1] or [1, 1])."""
        qx, sx = quantize_act_int8(x.reshape(-1, self.in_features), self.act_scale)  # [M, in] int8
        return int8_mm(qx, self.qweight), sx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if use_kernels(x):
            from lowbit.kernels import int8_gemm  # imports triton: only once a CUDA input shows up
            if int8_gemm.supported(x, self.in_features):  # same bytes as below, in two fused kernels
                return int8_gemm.int8_linear(x, self.qweight, self.w_scale, self.bias, self.act_scale)
        acc, sx = self.int_accumulate(x)  # [M, out]
        y = acc.float() * sx.float() * self.w_scale.reshape(1, -1)  # [M, out]: act_scale (x) w_scale
        return self._finish(y, x)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in]: int8 codes times the per-channel scale."""
        w = self.qweight.float() * self.w_scale                                  # [out, in] * [out, 1]
        return w if dtype is None else w.to(dtype)

    def _options(self):
        return {"static_act": self.static_act}


