"""GPTQ (Frantar et al., 2022): per-layer Hessians from calibration, column-wise quantization with error
feedback (the pure-tensor algorithm is lowbit.quant.gptq_core)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.gptq_core import HessianAccumulator, gptq_quantize
from lowbit.layers import WeightOnlyLinear
from lowbit.quant.methods.rtn import BudgetedGridConfig
from lowbit.quant.mixed import layer_spec
from lowbit.quant.registry import Method, Quantized, option, register

SCALE_DTYPE = torch.float16   # how WeightOnlyLinear stores scales; GPTQ chooses codes against exactly these


@dataclass
class GPTQConfig(BudgetedGridConfig):
    act_order: bool = option(False, "columns by descending Hessian diagonal (desc_act)")
    true_sequential: bool = option(True, "q/k/v, then o, then gate/up, then down, each group's statistics "
                                         "from the already quantized ones")
    percdamp: float = option(0.01, "dampening, a fraction of the mean Hessian diagonal")
    blocksize: int = option(128, "columns per lazy-batch block")
    mse_clip: bool = option(False, "MSE-optimal grid ranges instead of min-max")
    static_groups: bool = option(False, "groups are contiguous runs of the original columns, ranges taken "
                                        "before any update; with act-order no g_idx is stored "
                                        "(compressed-tensors actorder=\"weight\")")


@register("gptq")
class GPTQ(Method):
    config_cls = GPTQConfig
    needs_calibration = True
    shares_input_stats = True   # H depends on the inputs only: q/k/v share one, gate/up another

    def __init__(self, cfg: GPTQConfig):
        super().__init__(cfg)
        self.spec = cfg.spec()
        self.true_sequential = cfg.true_sequential
        self.layer_bits: dict[str, int] | None = None   # set by quant.api.quantize with --bits-budget

    def collector(self, ctx, name, linear):
        return HessianAccumulator()

    def quantize_linear(self, ctx, name, linear, stats: HessianAccumulator):
        c = self.cfg
        spec = layer_spec(self.spec, self.layer_bits, ctx.index, name)
        res = gptq_quantize(linear.weight.detach().float(), stats.H, spec, blocksize=c.blocksize,
                            percdamp=c.percdamp, act_order=c.act_order, mse_clip=c.mse_clip,
                            scale_dtype=SCALE_DTYPE, static_groups=c.static_groups)
        ragged = c.group_size > 0 and linear.in_features % c.group_size != 0
        # Static groups are contiguous (g_idx = arange // group_size) even with act_order: a g_idx only
        # for a short last group, and the layer is then not an act-order one.
        permuted = c.act_order and not c.static_groups
        layer = WeightOnlyLinear.from_quantized(
            res.codes, res.scale, None if c.sym else res.zero, spec, linear.bias,
            g_idx=res.g_idx if (permuted or ragged) else None, dtype=SCALE_DTYPE)
        return Quantized(layer, {"gptq_loss": res.loss, "percdamp": res.percdamp})
