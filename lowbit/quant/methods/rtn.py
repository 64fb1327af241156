"""RTN: round-to-nearest weight-only quantization, any bits / granularity / symmetry / range observer."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.registry import Method, MethodConfig, register


@dataclass
class RTNConfig(MethodConfig):
    bits: int = 4
    group_size: int = 128       # -1 per output channel, 0 per tensor, >0 groups along the input
    sym: bool = False
    zero_point: str = "int"     # "int" (GPTQ/AWQ convention) or "float" (GGUF Q4_1's real-valued minimum)
    observer: str = "minmax"    # weight range: minmax | percentile | mse | kl

    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=self.sym, group_size=self.group_size, zero_point=self.zero_point)


@register("rtn")
class RTN(Method):
    config_cls = RTNConfig

    def __init__(self, cfg: RTNConfig):
        super().__init__(cfg)
        self.spec = cfg.spec()  # validates bits / zero point up front

    def quantize_linear(self, name, linear, stats):
        obs = None if self.cfg.observer == "minmax" else self.cfg.observer
        return WeightOnlyLinear.from_linear(linear, self.spec, observer=obs)
