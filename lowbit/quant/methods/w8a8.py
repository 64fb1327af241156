"""W8A8 int8: per-channel int8 weights × per-token dynamic int8 activations, or static per-tensor scales."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.layers import Int8Linear
from lowbit.quant.methods.act_stats import ActQuantConfig, ActQuantMethod
from lowbit.quant.registry import Quantized, register


@dataclass
class W8A8Config(ActQuantConfig):
    pass


@register("w8a8")
class W8A8(ActQuantMethod):
    config_cls = W8A8Config

    def quantize_linear(self, ctx, name, linear, stats):
        scale = stats.absmax() / 127 if stats is not None else None
        return Quantized(Int8Linear.from_linear(linear, act_scale=scale))
