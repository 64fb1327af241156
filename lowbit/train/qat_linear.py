"""QATLinear: a trainable Linear whose forward sees its weight (and optionally its input) quantized.

It holds a float "latent" weight; the forward rounds it onto the grid with straight-through gradients
(lowbit.train.ste), so training moves the latent weights to where their rounded values work best. With
`learn_scales` the per-group scales and zero points are parameters too (LSQ); otherwise each step takes
the grid from the weights' min/max (LLM-QAT's MinMax). `to_quantized()` rounds once more, with the same
numbers, into the layer PTQ would have produced (WeightOnlyLinear, or FakeQuantLinear with int8
activations), so the trained model is saved, loaded and exported like any other.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec, quantize_weight
from lowbit.layers import FakeQuantLinear, WeightOnlyLinear
from lowbit.train.ste import act_fake_quant, lsq_codes, lsq_fake_quant, minmax_fake_quant


class QATLinear(nn.Module):
    """weight [out, in] (float32 Parameter), bias [out] or None; scale/zero [rows, G, 1] Parameters when
    learn_scales (zero None when symmetric); act_bits 0 (weights only) or 8 (int8 per-token inputs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec,
                 learn_scales: bool = False, act_bits: int = 0, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None):
        super().__init__()
        if act_bits not in (0, 8):
            raise LowbitError(f"--act-bits: 0 (weight-only) or 8 (int8 per-token activations), got {act_bits}")
        self.spec, self.learn_scales, self.act_bits = spec, bool(learn_scales), act_bits
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.scale = self.zero = None
        if self.learn_scales:
            if scale is None:   # start from the min/max grid, as stored (fp16 scales)
                _, scale, zero = quantize_weight(self.weight.detach(), spec, scale_dtype=torch.float16)
            self.scale = nn.Parameter(scale.detach().float().clone())                      # [rows, G, 1]
            if not spec.symmetric:
                self.zero = nn.Parameter(zero.detach().float().clone())                    # [rows, G, 1]

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, learn_scales: bool = False,
                    act_bits: int = 0) -> "QATLinear":
        """From a float nn.Linear: latent weight = its weight, scales from min/max."""
        return cls(linear.weight, linear.bias, spec, learn_scales, act_bits)

    @classmethod
    def from_weight_only(cls, layer: WeightOnlyLinear, learn_scales: bool = False,
                         act_bits: int = 0) -> "QATLinear":
        """From a PTQ result (GPTQ / AWQ / RTN): latent weight = its dequantized weight, scales = its scales."""
        if layer.act_order:
            raise LowbitError("QAT from an act-order layer (g_idx) is not supported: quantize without --act-order")
        zero = None if layer.zero is None else layer.zero.float().unsqueeze(-1)
        return cls(layer.dequantized_weight(), layer.bias, layer.spec, learn_scales, act_bits,
                   scale=layer.scale.float().unsqueeze(-1), zero=zero)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward multiplies by [out, in], with straight-through gradients."""
        if self.learn_scales:
            return lsq_fake_quant(self.weight, self.scale, self.zero, self.spec)
        return minmax_fake_quant(self.weight, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = act_fake_quant(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), b)

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """The inference layer with exactly the forward's rounding: WeightOnlyLinear (fp16 scales) for
        weight-only, FakeQuantLinear(act="int8") with int8 activations."""
        if self.act_bits:
            layer = FakeQuantLinear(self.in_features, self.out_features, self.spec, act="int8",
                                    bias=self.bias is not None, device=self.weight.device)
            layer._load("weight", self.quantized_weight().detach())
            layer._load_optional(bias=self.bias)
            return layer
        if not self.learn_scales:   # the same min/max grid and fp16 scales as minmax_fake_quant
            return WeightOnlyLinear.from_linear(self, self.spec)
        codes, scale, zero = lsq_codes(self.weight, self.scale, self.zero, self.spec)
        g = self.spec.group_size
        g_idx = torch.arange(self.in_features) // g if g > 0 and self.in_features % g else None
        return WeightOnlyLinear.from_quantized(codes, scale, zero, self.spec, self.bias, g_idx=g_idx)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.spec.tag}, "
                f"learn_scales={self.learn_scales}, act_bits={self.act_bits}")
