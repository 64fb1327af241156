"""FP8 W8A8 (e4m3): per-channel weight scales, dynamic or calibrated static per-tensor activation scale."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.layers import FP8Linear
from lowbit.quant.methods.act_stats import ActQuantConfig, ActQuantMethod
from lowbit.quant.registry import Quantized, option, register

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


@dataclass
class FP8Config(ActQuantConfig):
    per_channel: bool = option(True, "a weight scale per output channel (else one per tensor)")


@register("fp8")
class FP8(ActQuantMethod):
    config_cls = FP8Config

    def quantize_linear(self, ctx, name, linear, stats):
        scale = stats.absmax() / E4M3_MAX if stats is not None else None
        return Quantized(FP8Linear.from_linear(linear, per_channel=self.cfg.per_channel, act_scale=scale))
