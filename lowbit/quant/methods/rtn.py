"""RTN: round-to-nearest weight-only quantization, any bits / granularity / symmetry / range observer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lowbit.errors import LowbitError
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.mixed import layer_spec
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
class BudgetedGridConfig(WeightGridConfig):
    """A weight grid whose bits may vary per layer to meet an average (lowbit.quant.mixed)."""
    bits_budget: float = option(0.0, "average stored bits per weight, scales included: each layer's bits "
                                     "chosen from 3/4/8 by Hessian-diagonal sensitivity (needs --calib); "
                                     "0: every layer at --bits")

    def __post_init__(self):
        if self.bits_budget and not 3 < self.bits_budget <= 9:
            raise LowbitError(f"--bits-budget: expected 0 or a number in (3, 9], got {self.bits_budget:g}")


@dataclass
class RTNConfig(BudgetedGridConfig):
    observer: str = option("minmax", "weight range per group: minmax | percentile | mse | kl")


@register("rtn")
class RTN(Method):
    config_cls = RTNConfig

    def __init__(self, cfg: RTNConfig):
        super().__init__(cfg)
        self.spec = cfg.spec()  # validates bits / zero point up front
        self.layer_bits: dict[str, int] | None = None   # set by quant.api.quantize with --bits-budget

    @property
    def needs_calibration(self) -> bool:
        return bool(self.cfg.bits_budget)

    def quantize_linear(self, ctx, name, linear, stats):
        spec = layer_spec(self.spec, self.layer_bits, ctx.index, name)
        lo = hi = None   # minmax: the layer's own per-group min/max
        if self.cfg.observer != "minmax":
            lo, hi = observe_weight(linear.weight.detach().float(), spec, self.cfg.observer)
        return Quantized(WeightOnlyLinear.from_linear(linear, spec, lo=lo, hi=hi))
