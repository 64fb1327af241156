"""FP8 W8A8 (e4m3): torch._scaled_mm on CUDA sm >= 8.9, an fp32 emulation elsewhere."""
from __future__ import annotations


import torch
import torch.nn as nn

from lowbit.kernels import use_kernels
from lowbit.kernels.int8_matmul import (FP8_FMT, fp8_scaled_mm, quantize_act_fp8,
                                      scaled_mm_supported)
from lowbit.kernels.primitives import (fp8_dequantize, fp8_quantize)


from lowbit.layers.base import (_QuantLinear, _linear_weight)


class FP8Linear(_QuantLinear):
    """W8A8 fp8 (e4m3) linear. Buffers: qweight float8_e4m3fn [out, in], w_scale float32 [out, 1]
    (per_channel) or [1, 1], act_scale float32 [1] when static_act (else dynamic: per tensor, or per token
    with per_token_act, the compressed-tensors FP8_DYNAMIC scheme), bias."""

    kind = "fp8"
    _keep_dtype = ("qweight", "w_scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, per_channel: bool = True, static_act: bool = False,
                 bias: bool = True, dtype=torch.float16, device=None, per_token_act: bool = False):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.per_channel, self.static_act = bool(per_channel), bool(static_act)
        self.per_token_act = bool(per_token_act) and not self.static_act
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                    device=device))
        self.register_buffer("w_scale", torch.empty(out_features if per_channel else 1, 1,
                                                    dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, per_channel: bool = True, act_scale=None, dtype=None) -> "FP8Linear":
        """act_scale: static activation scale (calibrated absmax / 448), or None for per-tensor dynamic."""
        w = _linear_weight(linear)  # [out, in]
        layer = cls(w.shape[1], w.shape[0], per_channel=per_channel, static_act=act_scale is not None,
                    bias=linear.bias is not None, dtype=dtype or linear.weight.dtype, device=w.device)
        layer.qweight, layer.w_scale = fp8_quantize(w, FP8_FMT, per_channel=per_channel)  # [out, in], [out|1, 1]
        layer._load_optional(act_scale=act_scale, bias=linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if use_kernels(x):
            from lowbit.kernels import fp8_gemm  # imports triton: only once a CUDA input shows up
            if fp8_gemm.supported(x):  # the same activation scales as below (see fp8_gemm's docstring)
                return fp8_gemm.fp8_linear(x, self.qweight, self.w_scale, self.bias, self.act_scale,
                                           per_token=self.per_token_act)
        qx, sx = quantize_act_fp8(x.reshape(-1, self.in_features), self.act_scale,
                                  self.per_token_act)  # [M, in] fp8, [1, 1] or [M, 1] per token
        if scaled_mm_supported(qx, self.qweight) and not self.per_token_act:
            y = fp8_scaled_mm(qx, sx, self.qweight, self.w_scale)  # [M, out] float32
        else:  # emulation: what _scaled_mm computes, up to accumulation order
            y = fp8_dequantize(qx, sx) @ fp8_dequantize(self.qweight, self.w_scale).t()  # [M, out]
        return self._finish(y, x)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in]: fp8 codes times their scales."""
        w = fp8_dequantize(self.qweight, self.w_scale, torch.float32)
        return w if dtype is None else w.to(dtype)

    def _options(self):
        opts = {"per_channel": self.per_channel, "static_act": self.static_act}
        return {**opts, "per_token_act": True} if self.per_token_act else opts   # older configs lack the key


