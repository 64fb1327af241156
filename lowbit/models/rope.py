"""Rotary position embeddings, with the `rope_scaling` variants Llama-family configs use."""
from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import use_kernels


def _default(inv_freq: torch.Tensor, p: dict[str, Any], max_pos: int, theta: float) -> tuple[torch.Tensor, float]:
    return inv_freq, 1.0


def _linear(inv_freq, p, max_pos, theta):
    # Position interpolation (Chen et al. 2023): positions / factor  ==  inv_freq / factor.
    return inv_freq / p["factor"], 1.0


def _dynamic(inv_freq, p, max_pos, theta):
    # Dynamic NTK grows the base only past the trained length; inside it the frequencies are the default
    # ones, which is all a model evaluated within its context ever uses. We keep the static (in-context) form.
    return inv_freq, 1.0


def _llama3(inv_freq, p, max_pos, theta):
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp in between.
    factor, lo, hi = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", max_pos)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0


def _yarn(inv_freq, p, max_pos, theta):
    # YaRN (Peng et al. 2023): blend interpolated and extrapolated frequencies by a linear ramp over the
    # rotation count, and scale attention by 0.1·ln(factor)+1.
    factor = p["factor"]
    dim = inv_freq.numel() * 2
    old_ctx = p.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)
    attn = p.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low = corr_dim(beta_fast)
    high = corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    return inv_freq / factor * (1 - extrap) + inv_freq * extrap, attn


ROPE_VARIANTS = {"default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn}


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32) and the attention scale factor for cos/sin."""
    # Always on the CPU, also while a model is being built on the meta device; callers move it.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_VARIANTS:
        raise LowbitError(f"config: unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_VARIANTS)})")
    return ROPE_VARIANTS[kind](inv_freq, scaling or {}, max_pos, theta)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attn_scale: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (half-split layout, as in HF's rotate_half)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                        # [B, 1, T, hd]
    return (emb.cos() * attn_scale).to(dtype), (emb.sin() * attn_scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by the angles in cos/sin [B, 1, T, hd]."""
    if use_kernels(x):
        from lowbit.kernels.fused import rope
        return rope(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
