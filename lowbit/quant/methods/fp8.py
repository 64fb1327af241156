"""FP8 W8A8 (e4m3): per-channel weight scales, dynamic or calibrated static per-tensor activation scale."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.quant.layers import FP8Linear
from lowbit.quant.methods.act_stats import ActRange
from lowbit.quant.registry import Method, MethodConfig, register

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


@dataclass
class FP8Config(MethodConfig):
    act_scheme: str = "dynamic"
    per_channel: bool = True
    observer: str = "minmax"

    def __post_init__(self):
        if self.act_scheme not in ("dynamic", "static"):
            raise LowbitError(f"--act-scheme: expected dynamic or static, got {self.act_scheme!r}")


@register("fp8")
class FP8(Method):
    config_cls = FP8Config

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.act_scheme == "static"

    def collector(self, name, linear):
        return ActRange(self.cfg.observer) if self.cfg.act_scheme == "static" else None

    def quantize_linear(self, name, linear, stats):
        scale = stats.absmax() / E4M3_MAX if stats is not None else None
        return FP8Linear.from_linear(linear, per_channel=self.cfg.per_channel, act_scale=scale)
