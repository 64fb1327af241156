"""lowbit.kernels.primitives against straightforward float64 references written here."""

import math

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import (
    QuantSpec, dequantize, dequantize_groups, dequantize_per_token, fake_quantize, fake_quantize_weight,
    fp8_dequantize, fp8_quantize, group_minmax, pack, pack_int32, packed_numel, qparams, quantize,
    quantize_groups, quantize_per_token, quantize_weight, to_groups, unpack, unpack_int32,
)

BITS = list(range(2, 9))
MODES = [(True, "int"), (False, "int"), (False, "float")]  # (symmetric, zero_point)
GROUPS = [0, -1, 32, 128]


def ref_quant(x: np.ndarray, bits, symmetric, zero_point, group_size):
    """Elementwise float64 reference: (codes, dequantized, scale per element)."""
    out, d = x.shape
    g = d if group_size in (0, -1) else group_size
    xg = x.reshape(out, d // g, g)
    if group_size == 0:
        lo, hi = np.full((1, 1, 1), x.min()), np.full((1, 1, 1), x.max())
    else:
        lo, hi = xg.min(-1, keepdims=True), xg.max(-1, keepdims=True)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = np.maximum(np.abs(lo), np.abs(hi)) / qmax
        s = np.where(s > 0, s, 1.0)
        q = np.clip(np.round(xg / s), qmin, qmax)
        deq = q * s
    elif zero_point == "int":
        qmax = 2 ** bits - 1
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = (hi - lo) / qmax
        s = np.where(s > 0, s, 1.0)
        z = np.clip(np.round(-lo / s), 0, qmax)
        q = np.clip(np.round(xg / s) + z, 0, qmax)
        deq = (q - z) * s
    else:
        qmax = 2 ** bits - 1
        s = (hi - lo) / qmax
        s = np.where(s > 0, s, 1.0)
        q = np.clip(np.round((xg - lo) / s), 0, qmax)
        deq = q * s + lo
    s_full = np.broadcast_to(s, xg.shape)
    return q.reshape(x.shape), deq.reshape(x.shape), s_full.reshape(x.shape)


def _weight(seed, shape=(8, 256), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[0, :5] = 0.0  # exact zeros must stay exact in asymmetric-int mode
    w[1] = w[1].abs() + 0.1  # an all-positive row (range must be widened to contain 0)
    return w.to(dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric,zero_point", MODES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_codes_and_values_match_float64_reference(bits, symmetric, zero_point, group_size):
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size, zero_point=zero_point)
    w = _weight(bits * 100 + group_size)
    q, scale, zero = quantize_groups(w, spec)
    q_ref, deq_ref, s_ref = ref_quant(w.numpy(), bits, symmetric, zero_point, group_size)
    assert q.dtype == spec.code_dtype and q.shape == w.shape
    # Gaussian float64 data has no exact .5 ties, so codes must agree exactly.
    np.testing.assert_array_equal(q.numpy().astype(np.float64), q_ref)
    deq = dequantize_groups(q, scale, zero, spec)
    np.testing.assert_array_equal(deq.numpy(), deq_ref)
    np.testing.assert_array_equal(fake_quantize(w, spec).numpy(), deq_ref)
    # Round-to-nearest inside the range: every error is at most half a step.
    err = np.abs(deq.numpy() - w.numpy())
    assert np.all(err <= s_ref / 2 * (1 + 1e-9))
    if not symmetric and zero_point == "int":  # 0.0 is a grid point
        assert torch.all(deq[w == 0] == 0)
        assert torch.all(dequantize(zero.to(spec.code_dtype), scale, zero, spec) == 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,zero_point", MODES)
@pytest.mark.parametrize("group_size", [-1, 32])
def test_float32_matches_reference_up_to_near_ties(bits, symmetric, zero_point, group_size):
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size, zero_point=zero_point)
    w32 = _weight(7 + bits, dtype=torch.float32)
    q, scale, zero = quantize_groups(w32, spec)
    q_ref, deq_ref, s_ref = ref_quant(w32.double().numpy(), bits, symmetric, zero_point, group_size)
    # Unrounded reference code; float32 arithmetic may only flip codes that sit near a tie.
    x = w32.double().numpy()
    if symmetric or zero_point == "int":
        u = x / s_ref
    else:
        lo = to_groups(w32.double(), group_size).amin(-1, keepdim=True).expand(*to_groups(w32, group_size).shape)
        u = (x - lo.reshape(x.shape).numpy()) / s_ref
    near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < 1e-3
    diff = q.numpy().astype(np.float64) != q_ref
    assert not np.any(diff & ~near_tie)
    deq = dequantize_groups(q, scale, zero, spec).numpy()
    assert np.all(np.abs(deq - deq_ref) <= 1e-5 * np.abs(deq_ref) + 1e-6 + diff * s_ref * 1.001)


def test_rounding_is_half_to_even_and_clamped():
    spec = QuantSpec(bits=4, symmetric=True, group_size=0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 9.0, -9.0, -20.0])
    q = quantize(x, torch.tensor(1.0), 0, spec)
    assert q.tolist() == [0, 2, 2, 0, -2, 7, -8, -8]


@pytest.mark.parametrize("symmetric,zero_point", MODES)
def test_all_zero_and_constant_groups(symmetric, zero_point):
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=32, zero_point=zero_point)
    w = _weight(3, dtype=torch.float32)
    w[2] = 0.0  # an all-zero row
    w[3, :32] = 0.0  # an all-zero group
    w[4, 32:64] = 0.75  # a constant group
    q, scale, zero = quantize_groups(w, spec)
    assert torch.all(scale > 0) and torch.isfinite(scale).all() and torch.isfinite(zero).all()
    out = fake_quantize(w, spec)
    assert torch.isfinite(out).all()
    assert torch.all(out[2] == 0) and torch.all(out[3, :32] == 0)
    if zero_point == "float" or symmetric:
        assert torch.allclose(out[4, 32:64], torch.full((32,), 0.75))
    assert torch.all(fake_quantize(torch.zeros(4, 64), spec) == 0)


def test_shapes_and_broadcast_layouts():
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    x = torch.randn(2, 3, 128)
    lo, hi = group_minmax(x, 32)
    assert lo.shape == (2, 3, 4, 1)
    q, scale, zero = quantize_groups(x, spec)
    assert q.shape == x.shape and scale.shape == (2, 3, 4, 1) and zero.shape == (2, 3, 4, 1)
    assert quantize_groups(x, QuantSpec(4, False, -1))[1].shape == (2, 3, 1, 1)
    assert quantize_groups(x, QuantSpec(4, False, 0))[1].shape == (1, 1, 1, 1)
    # Custom layout (e.g. a KV cache [B, H, T, D] with one scale per head): plain broadcasting.
    kv = torch.randn(2, 4, 16, 8)
    s_spec = QuantSpec(bits=8, symmetric=True, group_size=0)
    scale, zero = qparams(-kv.abs().amax((2, 3), keepdim=True), kv.abs().amax((2, 3), keepdim=True), s_spec)
    back = dequantize(quantize(kv, scale, zero, s_spec), scale, zero, s_spec)
    assert back.shape == kv.shape and (back - kv).abs().max() <= scale.max() / 2 + 1e-6
    # bf16 in, bf16 out; scales stay float32.
    xb = torch.randn(4, 64).bfloat16()
    assert fake_quantize(xb, spec).dtype == torch.bfloat16
    assert quantize_groups(xb, spec)[1].dtype == torch.float32


def test_clipped_range_uses_given_lo_hi():
    spec = QuantSpec(bits=4, symmetric=False, group_size=-1, zero_point="float")
    x = torch.linspace(-3, 3, 64).reshape(1, 64)
    lo, hi = torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 1.0)
    out = fake_quantize(x, spec, lo, hi)
    assert out.min() == -1.0 and out.max() == pytest.approx(1.0)


def test_per_token_matches_reference():
    x = torch.randn(2, 5, 64, dtype=torch.float64) * torch.rand(2, 5, 1, dtype=torch.float64) * 10
    x[1, 2] = 0.0
    q, scale = quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (2, 5, 1)
    s_ref = x.abs().amax(-1, keepdim=True) / 127
    s_ref = torch.where(s_ref > 0, s_ref, torch.ones_like(s_ref))
    assert torch.equal(scale, s_ref)
    assert torch.equal(q.double(), torch.round(x / s_ref).clamp(-128, 127))
    back = dequantize_per_token(q, scale, dtype=torch.float64)
    assert torch.all((back - x).abs() <= s_ref / 2 * (1 + 1e-9))
    assert torch.all(back[1, 2] == 0)


@pytest.mark.parametrize("fmt,dtype,rel", [("e4m3", torch.float8_e4m3fn, 2 ** -4), ("e5m2", torch.float8_e5m2, 2 ** -3)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_round_trip(fmt, dtype, rel, per_channel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, generator=g) * torch.logspace(-2, 2, 32).unsqueeze(1)
    q, scale = fp8_quantize(x, fmt, per_channel=per_channel)
    assert q.dtype == dtype
    assert scale.shape == ((32, 1) if per_channel else (1, 1))
    amax = x.abs().amax(-1, keepdim=True) if per_channel else x.abs().amax()
    torch.testing.assert_close(scale, (amax / torch.finfo(dtype).max).expand_as(scale))
    assert torch.equal(q.view(torch.uint8), (x / scale).to(dtype).view(torch.uint8))  # torch's own cast
    back = fp8_dequantize(q, scale)
    normal = (x / scale).abs() >= torch.finfo(dtype).tiny  # subnormals have coarser relative steps
    assert normal.float().mean() > 0.9
    err = ((back - x).abs() / x.abs())[normal]
    assert err.max() <= rel
    # A static scale smaller than needed saturates instead of producing NaN.
    q2, _ = fp8_quantize(x * 10, fmt, scale=scale)
    assert torch.isfinite(fp8_dequantize(q2, scale)).all()


def _bitstream_ref(codes, bits):
    acc = 0
    for j, c in enumerate(codes):
        acc |= (int(c) & ((1 << bits) - 1)) << (j * bits)
    nb = (len(codes) * bits + 7) // 8
    return [(acc >> (8 * k)) & 0xFF for k in range(nb)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 64, 129])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    u = torch.randint(0, 1 << bits, (3, n), generator=g).to(torch.uint8)
    p = pack(u, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, packed_numel(n, bits))
    assert p.shape[-1] == math.ceil(n * bits / 8)
    assert p[0].tolist() == _bitstream_ref(u[0].tolist(), bits)
    assert torch.equal(unpack(p, bits, n), u)
    s = (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)  # signed codes
    assert torch.equal(unpack(pack(s, bits), bits, n, signed=True), s)
    w = pack_int32(s, bits)
    assert w.dtype == torch.int32 and w.shape == (3, math.ceil(packed_numel(n, bits) / 4))
    assert torch.equal(unpack_int32(w, bits, n, signed=True), s)


def test_pack_layouts_and_sizes():
    assert pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([-1, 5], dtype=torch.int8), 8).tolist() == [255, 5]
    assert pack_int32(torch.arange(8), 4).tolist() == [0x76543210]
    q = torch.randint(0, 16, (1024, 1024), dtype=torch.uint8)
    assert pack(q, 4).numel() * 1 == q.numel() // 2  # 4 bits per value
    assert pack(q & 7, 3).numel() == 1024 * 384  # 3 bits per value
    assert pack_int32(q, 4).numel() * 4 == q.numel() // 2


def test_pack_bad_input():
    with pytest.raises(LowbitError, match="integer tensor"):
        pack(torch.randn(8), 4)
    with pytest.raises(LowbitError, match="bits"):
        pack(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(LowbitError, match="n=9"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, 9)


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bad_bits(bits):
    with pytest.raises(LowbitError, match=r"bits must be an integer in \[2, 8\]"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("spec", [QuantSpec(4, False, 128), QuantSpec(3, True, 100), QuantSpec(4, False, 0),
                                  QuantSpec(4, False, -1), QuantSpec(4, False, 600)])
def test_weight_short_last_group_and_stored_scales(spec):
    """quantize_weight / fake_quantize_weight: the whole groups, then the short last group as a tensor of its
    own (column j in group j // g); scale_dtype rounds scales before codes are chosen."""
    w = torch.randn(40, 576, generator=torch.Generator().manual_seed(0))
    g = spec.group_size
    cut = 576 - 576 % g if g > 0 else 576
    parts = [(w[:, :cut], spec)] if cut else []
    if cut < 576:
        parts.append((w[:, cut:], QuantSpec(spec.bits, spec.symmetric, 576 % g)))
    ref = torch.cat([fake_quantize(p, s) for p, s in parts], 1)
    assert torch.equal(fake_quantize_weight(w, spec), ref)
    q, scale, zero = quantize_weight(w, spec, scale_dtype=torch.float16)
    assert scale.shape == ((1 if g == 0 else 40), -(-576 // g) if g > 0 else 1, 1)
    assert torch.equal(scale, scale.half().float())                       # exactly what fp16 storage holds
    gi = torch.arange(576) // g if g > 0 else torch.zeros(576, dtype=torch.long)
    deq = dequantize(q, scale[:, gi, 0], zero[:, gi, 0], spec)            # [out, in], group of each column
    assert torch.equal(deq, fake_quantize_weight(w, spec, scale_dtype=torch.float16))


def test_bad_spec_and_groups():
    with pytest.raises(LowbitError, match="group_size=48 does not divide the last dimension \\(256\\)"):
        quantize_groups(torch.randn(4, 256), QuantSpec(bits=4, group_size=48))
    with pytest.raises(LowbitError, match="group_size"):
        QuantSpec(bits=4, group_size=-2)
    with pytest.raises(LowbitError, match="zero_point"):
        QuantSpec(bits=4, zero_point="half")
    with pytest.raises(LowbitError, match="fp8 format"):
        fp8_quantize(torch.randn(4), "e3m4")
    with pytest.raises(LowbitError, match="0-d"):
        fake_quantize(torch.tensor(1.0), QuantSpec(bits=4, group_size=0))


def test_spec_properties():
    assert (QuantSpec(4, True).qmin, QuantSpec(4, True).qmax) == (-8, 7)
    assert (QuantSpec(3, False).qmin, QuantSpec(3, False).qmax) == (0, 7)
    assert QuantSpec(4, False, 128).tag == "int4-asym-g128"
    assert QuantSpec(8, True, -1).tag == "int8-sym-ch"
    assert QuantSpec(4, False, 32, "float").tag == "int4-fzp-g32"
