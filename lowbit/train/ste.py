"""Fake quantization with straight-through gradients: the math of quantization-aware training.

Rounding has zero gradient almost everywhere, so training through it needs a surrogate. The
straight-through estimator (Bengio et al. 2013) takes round(x) forward and the identity backward;
clamping keeps its true gradient (zero outside the grid), which gives the "clipped STE". LSQ (Esser et al.
2020) also learns the step size s: with u = w/s + z and q = clamp(round(u), qmin, qmax), w_hat = (q - z)·s
has  d w_hat / d s = q - z - w/s  inside the grid and  q - z  at its ends, and LSQ scales that gradient by
g = 1/sqrt(numel · qmax) so that steps on s are commensurate with steps on w.

Pure functions on tensors; the modules that hold the parameters are in lowbit.train.qat_linear.
"""
from __future__ import annotations

import math

import torch

from lowbit.kernels.int8_matmul import ACT_QUANT
from lowbit.kernels.primitives import (QuantSpec, fake_quantize_weight, from_groups, quantize, to_groups,
                                       weight_parts)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient multiplied by g backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def stored_ste(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """x rounded to the dtype a checkpoint stores it in (scales are fp16), identity backward, so the trained
    forward sees exactly the scales the converted layer will hold."""
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def minmax_fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w [out, in] on spec's grid with per-group min/max ranges (fp16-rounded scales, as WeightOnlyLinear
    stores them), identity backward. The ranges contain every weight, so nothing is clipped and the plain
    STE is the clipped one; re-deriving the range each step is LLM-QAT's MinMax weight quantizer."""
    return w + (fake_quantize_weight(w.detach(), spec, scale_dtype=torch.float16) - w).detach()


def lsq_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec,
                   lsq_grad: bool = True) -> torch.Tensor:
    """w [out, in] on spec's grid with learnable scale [rows, G, 1] and zero [rows, G, 1] (None when
    symmetric): an integer zero point is rounded (STE), a real-valued offset (GGUF Q4_1 style) is used as is.
    Scales are rounded to fp16 as stored. Gradients flow to w (clipped STE), scale (LSQ) and zero."""
    parts = []
    for cols, sub, groups in weight_parts(spec, w.shape[1]):
        wg = to_groups(w[:, cols], sub.group_size)                           # [rows, G_p, g]
        s = stored_ste(scale[:, groups])                                     # [rows, G_p, 1]
        if lsq_grad:   # LSQ's g with the number of weights each scale serves
            s = grad_scale(s, 1.0 / math.sqrt(wg.numel() / s.numel() * spec.qmax))
        if spec.symmetric:
            q = torch.clamp(round_ste(wg / s), spec.qmin, spec.qmax)
            parts.append(from_groups(q * s, w[:, cols].shape))
        elif spec.float_zero:
            m = stored_ste(zero[:, groups])
            q = torch.clamp(round_ste((wg - m) / s), spec.qmin, spec.qmax)
            parts.append(from_groups(q * s + m, w[:, cols].shape))
        else:
            z = torch.clamp(round_ste(zero[:, groups]), spec.qmin, spec.qmax)
            # round(w/s) + z, not round(w/s + z): the same integer in exact arithmetic, and the way
            # primitives.quantize rounds, so a tie in float32 cannot make the stored code differ
            q = torch.clamp(round_ste(wg / s) + z, spec.qmin, spec.qmax)
            parts.append(from_groups((q - z) * s, w[:, cols].shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)             # [out, in]


def act_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] through int8 per-token symmetric absmax quantization, exactly as FakeQuantLinear(act="int8")
    does at inference, identity backward. The absmax range contains every value, so nothing is clipped."""
    quant, dequant = ACT_QUANT["int8"]
    xq = dequant(*quant(x.detach().reshape(-1, x.shape[-1]), None))          # [M, d] float32
    return x + (xq.to(x.dtype).reshape(x.shape) - x).detach()


@torch.no_grad()
def lsq_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The codes lsq_fake_quant rounds to, for storage: w [out, in] -> (codes [out, in], scale [rows, G, 1]
    fp16-rounded, zero [rows, G, 1] rounded as used, or None when symmetric)."""
    s = scale.detach().float().to(torch.float16).float()                    # [rows, G, 1]
    z = None
    if not spec.symmetric:
        z = zero.detach().float()
        z = z.to(torch.float16).float() if spec.float_zero else torch.round(z).clamp(spec.qmin, spec.qmax)
    codes = []
    for cols, sub, groups in weight_parts(spec, w.shape[1]):
        wg = to_groups(w[:, cols].detach().float(), sub.group_size)          # [rows, G_p, g]
        q = quantize(wg, s[:, groups], 0 if z is None else z[:, groups], sub)
        codes.append(from_groups(q, w[:, cols].shape))
    return (codes[0] if len(codes) == 1 else torch.cat(codes, 1)), s, z
