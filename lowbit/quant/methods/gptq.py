"""GPTQ (Frantar et al., 2022): per-layer Hessians from calibration, column-wise quantization with error
feedback (the pure-tensor algorithm is lowbit.quant.gptq_core)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.gptq_core import HessianAccumulator, gptq_quantize
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.registry import Method, MethodConfig, register

SCALE_DTYPE = torch.float16   # how WeightOnlyLinear stores scales; GPTQ chooses codes against exactly these


@dataclass
class GPTQConfig(MethodConfig):
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    zero_point: str = "int"
    act_order: bool = False          # columns by descending Hessian diagonal ("desc_act")
    true_sequential: bool = True     # q/k/v, then o, then gate/up, then down, each seeing the quantized ones
    percdamp: float = 0.01           # dampening, fraction of the mean Hessian diagonal
    blocksize: int = 128             # lazy-batch block of columns
    mse_clip: bool = False           # MSE-optimal ranges instead of min-max


@register("gptq")
class GPTQ(Method):
    config_cls = GPTQConfig
    needs_calibration = True
    shares_input_stats = True   # H depends on the inputs only: q/k/v share one, gate/up another

    def __init__(self, cfg: GPTQConfig):
        super().__init__(cfg)
        self.spec = QuantSpec(bits=cfg.bits, symmetric=cfg.sym, group_size=cfg.group_size,
                              zero_point=cfg.zero_point)
        self.true_sequential = cfg.true_sequential

    def collector(self, name, linear):
        return HessianAccumulator()

    def quantize_linear(self, name, linear, stats: HessianAccumulator):
        c = self.cfg
        res = gptq_quantize(linear.weight.detach().float(), stats.H, self.spec, blocksize=c.blocksize,
                            percdamp=c.percdamp, act_order=c.act_order, mse_clip=c.mse_clip,
                            scale_dtype=SCALE_DTYPE)
        ragged = c.group_size > 0 and linear.in_features % c.group_size != 0
        layer = WeightOnlyLinear.from_quantized(
            res.codes, res.scale, None if c.sym else res.zero, self.spec, linear.bias,
            g_idx=res.g_idx if (c.act_order or ragged) else None, dtype=SCALE_DTYPE)
        layer.report_extra = {"gptq_loss": res.loss, "percdamp": res.percdamp}
        return layer
