"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8 int8.

For an input group whose producer is a norm (Llama: input_layernorm -> q/k/v, post_attention_layernorm ->
gate/up), with per-input-channel calibration maxima max|X_j| and the consumers' column maxima max|W_j| (the max
over all consumers' weight columns j):

    s_j = max|X_j|^α / max|W_j|^(1-α)       (max|W_j| clamped to >= 1e-5, s_j clamped to >= 1e-5)

and s is folded in (lowbit.quant.fold): the norm weight / s, the consumers' columns * s, so the consumers see X / s
(flatter per channel) and multiply W · diag(s). Then every Linear of the block becomes an Int8Linear: per-output-
channel symmetric int8 weights and per-token dynamic (act_scheme="dynamic") or static per-tensor
(act_scheme="static": calibrated max|x| / 127 of the smoothed input, the `observer`'s range) int8 activations --
the same layers and activation scales as the naive `w8a8` method, so the two compare like for like.

Which inputs are smoothed: only the norm-fed ones, as the paper and its reference implementation do for
Llama-style models (mit-han-lab/smoothquant smooth.py: smooth_ln_fcs_llama_like on input_layernorm -> q/k/v and
post_attention_layernorm -> gate/up; o_proj's and down_proj's inputs are quantized unsmoothed). With
linear_producers=True the Linear-fed groups are smoothed too (up_proj -> down_proj, and v_proj -> o_proj where the
shapes allow, i.e. not under GQA) -- an extension, off by default.

α: a float in [0, 1] (0.5 default, the paper's value for most models), or "auto": per block, every α of
0.0, 0.1, ..., 1.0 is tried on a copy of the block whose Linears are W8A8 fake-quantized (FakeQuantLinear with the
int8 per-channel weight grid and int8 activations of the chosen scheme; static scales from the calibrated maxima),
and the α with the smallest mean squared error of the block's output against the float block on the calibration
windows is kept (ties: the smaller α).

The channel maxima come from this block's calibration inputs in the layer walk (the previous blocks already
quantized), where the reference runs the whole float model once over its calibration set. A channel that is never
non-zero on the calibration data keeps s = 1 (the reference's formula would give 1e-5 and magnify unseen inputs).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant import fold
from lowbit.kernels.int8_matmul import INT8_SYM
from lowbit.layers import FakeQuantLinear, Int8Linear, swap_linear
from lowbit.quant.methods.act_stats import ActQuantConfig, ActQuantMethod, ChannelAbsMax
from lowbit.quant.registry import BlockReport, Quantized, option, register

ALPHA_GRID = tuple(i / 10 for i in range(11))       # "auto": 0.0, 0.1, ..., 1.0


@dataclass
class SmoothQuantConfig(ActQuantConfig):
    alpha: float | str = option(0.5, "migration strength in [0, 1], or 'auto' (searched per block)")
    linear_producers: bool = option(False, "also smooth Linear-fed inputs (down_proj; o_proj without GQA): "
                                           "not in the paper")

    def __post_init__(self):
        super().__post_init__()
        a = self.alpha
        if isinstance(a, str) and a.strip().lower() == "auto":
            self.alpha = "auto"
            return
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise LowbitError(f"--alpha: expected a number in [0, 1] or 'auto', got {self.alpha!r}") from None
        if isinstance(self.alpha, bool) or not 0.0 <= a <= 1.0:
            raise LowbitError(f"--alpha: expected a number in [0, 1] or 'auto', got {self.alpha!r}")
        self.alpha = a


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] = max|X_j|^α / max|W_j|^(1-α) for act_absmax [in] and the consumers' weights [out_i, in].

    max|W_j| is over every consumer's column j. Computed in float32; clamps as the reference (1e-5); s = 1 where
    the channel was never non-zero on the calibration data.
    """
    a = act_absmax.detach().float()
    w_absmax = torch.stack([w.detach().float().abs().amax(0).to(a.device) for w in weights]).amax(0)  # [in]
    s = (a.pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(a > 0, s, torch.ones_like(s))


@register("smoothquant")
class SmoothQuant(ActQuantMethod):
    config_cls = SmoothQuantConfig
    needs_calibration = True

    def smooth_groups(self, block: nn.Module, layout) -> list[tuple[str, tuple[str, ...]]]:
        groups, _ = fold.foldable_groups(block, layout)
        if self.cfg.linear_producers:
            return groups
        return [(p, cs) for p, cs in groups if fold.producer_is_norm(block, p)]

    @torch.no_grad()
    def channel_stats(self, ctx, xs: torch.Tensor):
        """(max|x| per input channel of every Linear {name: [in]}, the float block's outputs [N, S, d])."""
        stats = {n: ChannelAbsMax() for n in ctx.layout.linears}
        handles = []
        for name, st in stats.items():
            def hook(_m, args, _st=st):
                _st.update(args[0])
            handles.append(ctx.block.get_submodule(name).register_forward_pre_hook(hook))
        try:
            out = ctx.run(xs)
        finally:
            for h in handles:
                h.remove()
        return {n: st.absmax for n, st in stats.items()}, out

    def scales_for(self, block: nn.Module, groups, absmax: dict, alpha: float) -> list[torch.Tensor]:
        return [smooth_scales(absmax[cs[0]], [block.get_submodule(c).weight for c in cs], alpha) for _, cs in groups]

    @torch.no_grad()
    def block_error(self, ctx, groups, absmax: dict, alpha: float, xs, ref) -> float:
        """Mean squared error of the block's output after smoothing with α and W8A8 fake-quant, vs `ref`."""
        trial = copy.deepcopy(ctx.block)
        scales = self.scales_for(trial, groups, absmax, alpha)
        input_max = {n: a.clone() for n, a in absmax.items()}                 # max|x| per channel after smoothing
        for (p, cs), s in zip(groups, scales):
            fold.fold_scale(trial, p, cs, s)
            for c in cs:
                input_max[c] = absmax[c] / s
        for name in ctx.layout.linears:
            lin = trial.get_submodule(name)
            scale = input_max[name].max().reshape(1) / 127 if self.cfg.act_scheme == "static" else None
            swap_linear(trial, name, FakeQuantLinear.from_linear(lin, spec=INT8_SYM, act="int8", act_scale=scale,
                                                                 dtype=lin.weight.dtype))
        out = ctx.run(xs, fn=trial)
        return (out.float() - ref.float()).pow(2).mean().item()

    def prepare_block(self, ctx, xs):
        absmax, ref = self.channel_stats(ctx, xs)
        block = ctx.block
        groups = self.smooth_groups(block, ctx.layout)
        entry = {"groups": [p for p, _ in groups]}
        alpha = self.cfg.alpha
        if alpha == "auto":
            errs = {a: self.block_error(ctx, groups, absmax, a, xs, ref) for a in ALPHA_GRID}
            alpha = min(ALPHA_GRID, key=lambda a: (errs[a], a))
            entry["errors"] = errs
        entry["alpha"] = alpha
        for (p, cs), s in zip(groups, self.scales_for(block, groups, absmax, alpha)):
            fold.fold_scale(block, p, cs, s)
        ctx.scratch["alpha"] = {c: alpha for _, cs in groups for c in cs}   # for the layers' report rows
        return BlockReport(entry)

    def quantize_linear(self, ctx, name, linear, stats):
        scale = stats.absmax() / 127 if stats is not None else None
        return Quantized(Int8Linear.from_linear(linear, act_scale=scale),
                         {"alpha": ctx.scratch.get("alpha", {}).get(name)})
