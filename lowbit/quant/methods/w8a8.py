"""W8A8 int8: per-channel int8 weights × per-token dynamic int8 activations, or static per-tensor scales."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.quant.layers import Int8Linear
from lowbit.quant.methods.act_stats import ActRange
from lowbit.quant.registry import Method, MethodConfig, register


@dataclass
class W8A8Config(MethodConfig):
    act_scheme: str = "dynamic"   # "dynamic" per token, or "static" per tensor from calibration
    observer: str = "minmax"      # activation range observer for the static scheme

    def __post_init__(self):
        if self.act_scheme not in ("dynamic", "static"):
            raise LowbitError(f"--act-scheme: expected dynamic or static, got {self.act_scheme!r}")


@register("w8a8")
class W8A8(Method):
    config_cls = W8A8Config

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.act_scheme == "static"

    def collector(self, name, linear):
        return ActRange(self.cfg.observer) if self.cfg.act_scheme == "static" else None

    def quantize_linear(self, name, linear, stats):
        scale = stats.absmax() / 127 if stats is not None else None
        return Int8Linear.from_linear(linear, act_scale=scale)
