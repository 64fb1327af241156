"""RTN: round-to-nearest weight-only quantization, any bits / granularity / symmetry / range observer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.observers import observe_weight
from lowbit.quant.registry import Method, MethodConfig, Quantized, option, register


@dataclass
class WeightGridConfig(MethodConfig):
    """The weight grid of the weight-only methods (RTN, AWQ, GPTQ)."""
    bits: int = option(4, "weight bits, 2..8")
    group_size: int = option(128, "weights per scale along the input: N (a short last group where N does not "
                                  "divide it), -1 per output channel, 0 per tensor")
    sym: bool = option(False, "symmetric weight grid (no zero point)")
    zero_point: Literal["int", "float"] = option(
        "int", "asymmetric offset: an integer zero point (GPTQ/AWQ) or the real minimum (GGUF Q4_1)")

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=self.sym, group_size=self.group_size, zero_point=self.zero_point)


@dataclass
class RTNConfig(WeightGridConfig):
    observer: str = option("minmax", "weight range per group: minmax | percentile | mse | kl")


@register("rtn")
class RTN(Method):
    config_cls = RTNConfig

    def __init__(self, cfg: RTNConfig):
        super().__init__(cfg)
        self.spec = cfg.spec()  # validates bits / zero point up front

    def quantize_linear(self, ctx, name, linear, stats):
        lo = hi = None   # minmax: the layer's own per-group min/max
        if self.cfg.observer != "minmax":
            lo, hi = observe_weight(linear.weight.detach().float(), self.spec, self.cfg.observer)
        return Quantized(WeightOnlyLinear.from_linear(linear, self.spec, lo=lo, hi=hi))
