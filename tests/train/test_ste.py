"""Straight-through fake quantization (lowbit.train.ste) against its definition, in float64: the forward
equals the PTQ grid's quantize-dequantize, and the gradients equal the clipped STE's and LSQ's formulas
computed directly, element by element."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.kernels.int8_matmul import ACT_QUANT
from lowbit.kernels.primitives import QuantSpec, fake_quantize_weight, quantize_weight, weight_parts
from lowbit.train.ste import (act_fake_quant, grad_scale, lsq_codes, lsq_fake_quant, minmax_fake_quant,
                              round_ste)

SPECS = [QuantSpec(4, False, 32), QuantSpec(3, True, 32), QuantSpec(4, False, 32, "float"),
         QuantSpec(4, False, -1), QuantSpec(2, True, 0), QuantSpec(4, False, 40)]   # g40 of 72: ragged


def _w(shape=(6, 72), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.2, 1.5, -2.7], dtype=torch.float64, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -3.0], dtype=torch.float64))
    y.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    s = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 2.0
    z.backward()
    assert s.grad.item() == 0.25


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_minmax_forward_is_the_ptq_grid_and_the_gradient_is_the_identity(spec):
    w = _w().requires_grad_(True)
    y = minmax_fake_quant(w, spec)
    assert torch.allclose(y.detach(), fake_quantize_weight(w.detach(), spec, scale_dtype=torch.float16),
                          rtol=0, atol=1e-12)   # w + (q - w) rounds in the last bit
    g = _w(seed=1)
    y.backward(g)
    assert torch.equal(w.grad, g)   # min/max ranges clip nothing: the clipped STE is the identity


def _lsq_reference(w, s, z, spec, g_out):
    """LSQ's forward and gradients written out per element from the paper's definitions (Esser et al.,
    eq. 1-3; the zero point's as LSQ+): u = w/s + z, q = clamp(round(u)); dw = g·[q in range];
    ds = Σ g·(q - z - w/s if in range else clamp(round(u)) - z) · gscale; dz = Σ g·(0 if in range else -s)."""
    out, dw = torch.zeros_like(w), torch.zeros_like(w)
    ds, dz = torch.zeros_like(s), None if z is None else torch.zeros_like(z)
    for cols, sub, groups in weight_parts(spec, w.shape[1]):
        gsz = sub.group_size if sub.group_size > 0 else (w.shape[1] if sub.group_size == -1 else w.numel())
        gscale = 1.0 / math.sqrt(gsz * spec.qmax)
        for r in range(w.shape[0]):
            for c in range(cols.start, cols.stop):
                gi = groups.start + ((c - cols.start) // sub.group_size if sub.group_size > 0 else 0)
                rs = 0 if s.shape[0] == 1 else r
                sv = float(s[rs, gi, 0])
                if spec.symmetric:
                    zv = 0.0
                elif spec.float_zero:
                    zv = float(z[rs, gi, 0])
                else:
                    zv = float(min(max(round(float(z[rs, gi, 0])), spec.qmin), spec.qmax))
                u = (float(w[r, c]) - zv) / sv if spec.float_zero else float(w[r, c]) / sv + zv
                qr = float(torch.round(torch.tensor(u, dtype=torch.float64)))
                inside = spec.qmin <= qr <= spec.qmax
                q = min(max(qr, spec.qmin), spec.qmax)
                gv = float(g_out[r, c])
                if spec.float_zero:
                    out[r, c] = q * sv + zv
                    dw[r, c] = gv if inside else 0.0
                    ds[rs, gi, 0] += gv * ((q - (float(w[r, c]) - zv) / sv) if inside else q) * gscale
                    dz[rs, gi, 0] += gv * (0.0 if inside else 1.0)
                else:
                    out[r, c] = (q - zv) * sv
                    dw[r, c] = gv if inside else 0.0
                    ds[rs, gi, 0] += gv * ((q - zv - float(w[r, c]) / sv) if inside else (q - zv)) * gscale
                    if dz is not None:
                        dz[rs, gi, 0] += gv * (0.0 if inside else -sv)
    return out, dw, ds, dz


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_lsq_forward_and_gradients_match_the_definition(spec):
    w = _w(seed=2)
    _, s, z = quantize_weight(w, spec)                               # [rows, G, 1]
    s = (s * 0.5).to(torch.float16).to(torch.float64)                # narrower than min/max: some weights clip
    # a non-integer zero exercises its rounding; a real-valued offset is stored (and used) in fp16
    z = None if spec.symmetric else (z + 0.3).to(torch.float16).to(torch.float64)
    w.requires_grad_(True)
    sp = s.clone().requires_grad_(True)
    zp = None if z is None else z.clone().requires_grad_(True)
    g_out = _w(seed=3)
    y = lsq_fake_quant(w, sp, zp, spec)
    y.backward(g_out)
    out, dw, ds, dz = _lsq_reference(w.detach(), s, z, spec, g_out)
    assert torch.allclose(y.detach(), out, rtol=0, atol=1e-12)
    assert torch.allclose(w.grad, dw, rtol=1e-12, atol=0)     # (1/s)·s is 1 up to the last bit
    assert torch.allclose(sp.grad, ds, rtol=1e-9, atol=1e-12)
    if zp is not None:
        assert torch.allclose(zp.grad, dz, rtol=1e-9, atol=1e-12)
    clipped = (dw == 0).double().mean().item()
    assert 0 < clipped < 0.9                                      # the test exercises both branches


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_lsq_from_minmax_scales_equals_the_ptq_grid_and_its_codes(spec):
    w = _w(seed=4)
    q, s, z = quantize_weight(w, spec, scale_dtype=torch.float16)
    y = lsq_fake_quant(w, s, None if spec.symmetric else z, spec)
    assert torch.allclose(y, fake_quantize_weight(w, spec, scale_dtype=torch.float16), rtol=0, atol=1e-12)
    codes, s2, z2 = lsq_codes(w, s, None if spec.symmetric else z, spec)
    assert torch.equal(codes, q) and torch.equal(s2, s.float())


def test_act_fake_quant_is_the_int8_layers_rounding_with_identity_gradient():
    x = _w((3, 5, 16), seed=5).float().requires_grad_(True)
    quant, dequant = ACT_QUANT["int8"]
    want = dequant(*quant(x.detach().reshape(-1, 16), None)).reshape(3, 5, 16)
    y = act_fake_quant(x)
    assert torch.equal(y.detach(), want)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
