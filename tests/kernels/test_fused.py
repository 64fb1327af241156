"""Fused RMSNorm / RoPE / SiLU*mul kernels against the model's PyTorch reference: the dispatch on CPU (in
CI), the kernels under Triton's interpreter (CPU, when Triton works here) and on the GPU (marked)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import triton_interpreter_ok
from lowbit.kernels import kernels_disabled
from lowbit.models.llama import RMSNorm
from lowbit.models.rope import apply_rope, rope_cos_sin


def test_cpu_dispatch_is_the_reference():
    norm = RMSNorm(64, 1e-5)
    x = torch.randn(3, 5, 64)
    with kernels_disabled():
        ref = norm(x)
    assert torch.equal(norm(x), ref)  # no CUDA tensor: the kernels never run


CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from lowbit.kernels.fused import rms_norm, rope, silu_mul
    from lowbit.models.rope import rope_cos_sin
    dev = {dev!r}
    worst = 0.0
    for dtype in {dtypes}:
        for (B, H, T, hd, D) in ((1, 4, 1, 64, 96), (2, 3, 5, 128, 576), (1, 32, 7, 128, 4096)):
            g = torch.Generator().manual_seed(T)
            x = torch.randn(B, T, D, generator=g).to(dev, dtype)
            w = (1 + 0.1 * torch.randn(D, generator=g)).to(dev, dtype)
            xd = x.double()
            ref = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5))
            worst = max(worst, float((rms_norm(x, w, 1e-5).double() - ref).abs().max() / ref.abs().max()))
            # q as the model makes it: a [B, T, H, hd] projection viewed as [B, H, T, hd] (strided)
            q = torch.randn(B, T, H, hd, generator=g).to(dev, dtype).transpose(1, 2)
            pos = torch.randint(0, 4096, (B, T), generator=g).to(dev)
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).double() / hd))
            cos, sin = rope_cos_sin(pos, inv.float().to(dev), 1.0, dtype)
            qd, c, s = q.double(), cos.double(), sin.double()
            refq = qd * c + torch.cat([-qd[..., hd // 2:], qd[..., :hd // 2]], -1) * s
            worst = max(worst, float((rope(q, cos, sin).double() - refq).abs().max() / refq.abs().max()))
            gt, ut = torch.randn(B, T, 3 * D, generator=g).to(dev, dtype), torch.randn(B, T, 3 * D, generator=g).to(dev, dtype)
            refm = F.silu(gt.double()) * ut.double()
            worst = max(worst, float((silu_mul(gt, ut).double() - refm).abs().max() / refm.abs().max()))
    print(worst)
""")


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs a working Triton CPU interpreter")
def test_fused_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cpu", dtypes="(torch.float32,)")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.gpu
def test_fused_kernels_on_gpu():
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cuda", dtypes="(torch.float32, torch.bfloat16, "
                                                                                "torch.float16)")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-2   # one bf16 rounding (2^-8) of the output


@pytest.mark.gpu
def test_model_ops_with_kernels_match_reference_on_gpu():
    norm = RMSNorm(4096, 1e-5).cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 4096, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(3, device="cuda").expand(2, 3)
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    cos, sin = rope_cos_sin(pos, inv, 1.0, torch.bfloat16)
    q = torch.randn(2, 3, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    outs = (norm(x), apply_rope(q, cos, sin))
    with kernels_disabled():
        refs = (norm(x), apply_rope(q, cos, sin))
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert float((o.float() - r.float()).abs().max() / r.float().abs().max()) < 1e-2
