"""Fake quantization (quantize-dequantize): the reference the real layers are checked against."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.int8_matmul import (ACT_QUANT, FP8_FMT)
from lowbit.kernels.primitives import QuantSpec, fake_quantize_weight, fp8_dequantize, fp8_quantize


from lowbit.layers.base import (FP8_WEIGHT, _QuantLinear, _as_spec, _grouped_shape, _linear_weight,
                                       _weight_range)


# ----------------------------------------------------------------------------- fake quant

class FakeQuantLinear(_QuantLinear):
    """Simulation/reference: weight [out, in] (already quantize-dequantized) in dtype, bias, and
    optional activation fake-quant act in ACT_QUANT ("int8" per-token, "fp8" per-tensor), with a
    static act_scale [1] when static_act. spec (QuantSpec, its dict, "fp8", "fp8_channel" or None)
    records how the weight was quantized."""

    kind = "fake"

    def __init__(self, in_features: int, out_features: int, spec=None, act: str | None = None,
                 static_act: bool = False, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if act is not None and act not in ACT_QUANT:
            raise LowbitError(f"act must be None or one of {sorted(ACT_QUANT)}, got {act!r}")
        if static_act and act is None:
            raise LowbitError("static_act needs an activation format (act='int8' or 'fp8')")
        if isinstance(spec, str) and spec not in FP8_WEIGHT:
            raise LowbitError(f"spec must be a QuantSpec, None or one of {sorted(FP8_WEIGHT)}, got {spec!r}")
        self.spec = spec if spec is None or isinstance(spec, str) else _as_spec(spec)
        if isinstance(self.spec, QuantSpec):
            _grouped_shape(self.spec, out_features, in_features)
        self.act, self.static_act = act, bool(static_act)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self._dtype, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec=None, act: str | None = None, act_scale=None, lo=None, hi=None,
                    scale_dtype: torch.dtype | None = None, dtype=torch.float32) -> "FakeQuantLinear":
        """Weight -> primitives.fake_quantize_weight(spec) (scale/zero first rounded to scale_dtype if given,
        as WeightOnlyLinear stores them), or fp8 e4m3 for spec "fp8"/"fp8_channel", or kept for None."""
        w = _linear_weight(linear)  # [out, in]
        layer = cls(w.shape[1], w.shape[0], spec, act=act, static_act=act_scale is not None,
                    bias=linear.bias is not None, dtype=dtype, device=w.device)
        if isinstance(layer.spec, QuantSpec):
            lo, hi = _weight_range(w, layer.spec, lo, hi)
            w = fake_quantize_weight(w, layer.spec, lo, hi, scale_dtype)  # [out, in]
        elif layer.spec is not None:
            w = fp8_dequantize(*fp8_quantize(w, FP8_FMT, per_channel=FP8_WEIGHT[layer.spec]))
        layer._load("weight", w)
        layer._load_optional(act_scale=act_scale, bias=linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.act is not None:
            quant, dequant = ACT_QUANT[self.act]
            xq = dequant(*quant(x.reshape(-1, self.in_features), self.act_scale))  # [M, in] float32
            x = xq.to(x.dtype).reshape(x.shape)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)

    def format_nbytes(self) -> int:
        """Packed size of the simulated format: `bits` per weight code, an fp16 scale (and zero when
        asymmetric) per group, fp8 codes + fp32 scales, and the bias in fp16; a float weight as held."""
        extra = (0 if self.bias is None else 2 * self.bias.numel()) + \
            (0 if self.act_scale is None else 4)        # bias counted in fp16, as the packed layers store it
        out_f, in_f = self.out_features, self.in_features
        if isinstance(self.spec, QuantSpec):
            s = self.spec
            groups = {0: 1, -1: out_f}.get(s.group_size) or out_f * math.ceil(in_f / max(s.group_size, 1))
            return math.ceil(out_f * in_f * s.bits / 8) + groups * 2 * (1 if s.symmetric else 2) + extra
        if self.spec is not None:  # fp8 e4m3 codes, one fp32 scale per row or per tensor
            return out_f * in_f + 4 * (out_f if FP8_WEIGHT[self.spec] else 1) + extra
        return self.nbytes()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer multiplies by [out, in] (float32 unless dtype)."""
        return self.weight.float() if dtype is None else self.weight.to(dtype)

    def _options(self):
        spec = dataclasses.asdict(self.spec) if isinstance(self.spec, QuantSpec) else self.spec
        return {"spec": spec, "act": self.act, "static_act": self.static_act}

    def extra_repr(self):
        tag = self.spec.tag if isinstance(self.spec, QuantSpec) else self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={tag}, "
                f"act={self.act}, static_act={self.static_act}, bias={self.bias is not None}")


