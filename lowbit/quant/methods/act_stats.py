"""Activation statistics gathered during calibration, shared by the W8A8-style methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.errors import LowbitError
from lowbit.quant.observers import get_observer
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.registry import Method, MethodConfig, option

PER_TENSOR_INT8 = QuantSpec(bits=8, symmetric=True, group_size=0)


class ActRange:
    """A per-tensor activation range from a calibration observer -> a static scale for `qmax` levels."""

    def __init__(self, observer: str = "minmax", spec: QuantSpec = PER_TENSOR_INT8):
        self.obs = get_observer(observer, spec)

    def update(self, x: torch.Tensor) -> None:
        self.obs.update(x.detach().float().reshape(-1, x.shape[-1]))

    def absmax(self) -> torch.Tensor:
        lo, hi = self.obs.compute()
        return torch.maximum(lo.abs(), hi.abs()).reshape(())


class ChannelAbsMax:
    """Per-input-channel max |x| over the calibration set (SmoothQuant, LLM.int8() outlier stats)."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()    # [in]
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


@dataclass
class ActQuantConfig(MethodConfig):
    """Activation quantization options shared by the W8A8-style methods."""
    act_scheme: Literal["dynamic", "static"] = option(
        "dynamic", "activation scales: per token at run time, or static per tensor from calibration")
    observer: str = option("minmax", "activation range for --act-scheme static: minmax | percentile | mse | kl")

    def __post_init__(self):
        if self.act_scheme not in ("dynamic", "static"):
            raise LowbitError(f"--act-scheme: expected dynamic or static, got {self.act_scheme!r}")


class ActQuantMethod(Method):
    """A method whose layers quantize activations: static scales need calibration, dynamic ones do not."""

    @property
    def needs_calibration(self) -> bool:
        return self.cfg.act_scheme == "static"

    def collector(self, ctx, name, linear):
        return ActRange(self.cfg.observer) if self.cfg.act_scheme == "static" else None
