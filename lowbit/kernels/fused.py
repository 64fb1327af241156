"""Fused elementwise kernels of the decoder (Triton): RMSNorm, RoPE, SiLU(gate) * up.

In a batch-1 decode step these ops move kilobytes, yet in PyTorch each is 2-8 separate kernels
(RMSNorm: cast, square, mean, add, rsqrt, multiply, cast, scale); on Llama-3-8B they were about 1,100
of a step's 1,600 kernels and a quarter of its GPU time (benchmarks/results/decode_h100.md). One
kernel each, computing in fp32 and rounding once, instead. The PyTorch code in lowbit.models stays the
reference (the path on CPU and with kernels disabled); results differ from it only by that rounding.
"""
from __future__ import annotations

import torch

from lowbit.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, eps, BLOCK: tl.constexpr):
        """One row per program: out = w * (x / sqrt(mean(x^2) + eps)), the normalised x rounded to the
        input dtype before the weight multiplies it (as the reference and HF do)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        y = (x * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * D + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, sxb, sxh, sxt, scb, sct,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
        """One (b, h, t) row of x [B, H, T, hd] (any strides, last dim contiguous) per program; out is
        contiguous [B, H, T, hd]. Half-split rotation: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
        pid = tl.program_id(0)
        t, h, b = pid % T, (pid // T) % H, pid // (T * H)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        xp = x_ptr + b * sxb + h * sxh + t * sxt
        x1 = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        cp, sp = cos_ptr + b * scb + t * sct, sin_ptr + b * scb + t * sct
        c1 = tl.load(cp + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cp + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sp + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sp + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        op = out_ptr + pid * 2 * HALF
        tl.store(op + offs, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(op + HALF + offs, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> RMSNorm(x) * weight in x's dtype."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()                                       # [rows, D]
    out = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight.to(x.dtype), out, D, eps, BLOCK=triton.next_power_of_2(D),
                                     num_warps=4 if D <= 4096 else 8)
    return out.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] rotated by cos/sin [B, 1, T, hd] (the half-split layout of apply_rope)."""
    B, H, T, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, 1, T, hd).contiguous(), sin.expand(B, 1, T, hd).contiguous()
    out = torch.empty(B, H, T, hd, dtype=x.dtype, device=x.device)
    _rope_kernel[(B * H * T,)](x, cos, sin, out, H, T, x.stride(0), x.stride(1), x.stride(2),
                               cos.stride(0), cos.stride(2), HALF=hd // 2,
                               BLOCK=triton.next_power_of_2(hd // 2), num_warps=1)
    return out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SiLU(g) * u, elementwise, in g's dtype."""
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](g, u, out, n, BLOCK=1024, num_warps=4)
    return out
