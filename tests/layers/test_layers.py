"""Quantized linear layers: each real layer against its fake-quant / integer / float64 reference."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.kernels import kernels_disabled
from lowbit.kernels.int8_matmul import int8_mm
from lowbit.layers import (INT8_SYM, LAYER_CLASSES, FakeQuantLinear, FP8Linear, Int8Linear,
                                 WeightOnlyLinear, build_layer, swap_linear)
from lowbit.models.arch import LLAMA
from lowbit.quant.observers import get_observer, observe
from lowbit.quant.registry import get_method
from lowbit.quant.walk import BlockContext
from lowbit.kernels.primitives import (QuantSpec, fake_quantize, fp8_dequantize, fp8_quantize,
                                     quantize, quantize_groups, quantize_per_token)

IN, OUT = 256, 48


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: on a busy shared CPU, thread wake-ups cost more than the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linear(in_f=IN, out_f=OUT, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.5, 3.0, out_f)[:, None])  # rows of different ranges
        if bias:
            lin.bias.uniform_(-1, 1)
    return lin.to(dtype)


def _close(a, b, rtol, atol):
    # torch.allclose, not torch.testing.assert_close: the latter's first call imports ~1 s of modules.
    assert a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=rtol, atol=atol), \
        float((a - b).abs().max())


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


MODES = {"sym": dict(symmetric=True), "asym": dict(symmetric=False), "fzp": dict(symmetric=False, zero_point="float")}


# ----------------------------------------------------------------------------- weight-only

@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_only_equals_fake_quant(bits, group, mode):
    spec = QuantSpec(bits=bits, group_size=group, **MODES[mode])
    x = _x(3, 5, IN)
    for bias in (True, False):
        lin = _linear(bias=bias)
        real = WeightOnlyLinear.from_linear(lin, spec, dtype=torch.float32)
        ref = FakeQuantLinear.from_linear(lin, spec)  # primitives.fake_quantize, float32 scales
        assert torch.equal(real.dequantized_weight(), fake_quantize(lin.weight.detach(), spec))
        with kernels_disabled():  # the dequantize path; the CPU kernels sum in another order (test_cpu_wq.py)
            assert torch.equal(real(x), ref(x))
        _close(real(x), ref(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_weight_only_fp16_storage_matches_reference(mode):
    # Scales stored in fp16: the reference rounds its scales the same way before quantizing.
    spec = QuantSpec(bits=4, group_size=32, **MODES[mode])
    lin = _linear()
    lin.bias.data = lin.bias.data.half().float()  # bias is stored in fp16 too
    real = WeightOnlyLinear.from_linear(lin, spec)
    assert real.scale.dtype == torch.float16 and real.qweight.dtype == torch.uint8
    ref = FakeQuantLinear.from_linear(lin, spec, scale_dtype=torch.float16)
    x = _x(4, IN)
    with kernels_disabled():  # the dequantize path; the CPU kernels sum in another order (test_cpu_wq.py)
        assert torch.equal(real(x), ref(x))
    _close(real(x), ref(x), rtol=0, atol=1e-4)
    # ...and is as accurate as the float32-scale fake quant (a few codes flip at rounding ties).
    w = lin.weight.detach()
    err16, err32 = (real.dequantized_weight() - w).square().mean(), (fake_quantize(w, spec) - w).square().mean()
    assert err16 <= 1.01 * err32
    assert real(x.half()).dtype == torch.float16


def test_weight_only_given_ranges_and_observer():
    # A layer takes ranges; finding them (an observer) is the method's job: RTN's observer option.
    spec = QuantSpec(bits=4, group_size=64)
    lin = _linear(bias=False)
    w = lin.weight.detach()
    lo, hi = get_observer("mse", spec, steps=10)(w)  # [out, G, 1], clipped
    b = WeightOnlyLinear.from_linear(lin, spec, lo=lo, hi=hi, dtype=torch.float32)
    c = WeightOnlyLinear.from_linear(lin, spec, lo=lo.squeeze(-1), hi=hi.squeeze(-1), dtype=torch.float32)
    ref = fake_quantize(w, spec, lo, hi)
    assert torch.equal(b.dequantized_weight(), ref) and torch.equal(c.dequantized_weight(), ref)
    ctx = BlockContext(0, nn.Module(), LLAMA)
    a = get_method("rtn", bits=4, group_size=64, observer="percentile").quantize_linear(ctx, "mlp.up_proj", lin, None)
    plo, phi = get_observer("percentile", spec)(w)
    pref = WeightOnlyLinear.from_linear(lin, spec, lo=plo, hi=phi).dequantized_weight()   # fp16 scales, as RTN's
    assert a.layer.dequantized_weight().shape == ref.shape and torch.equal(a.layer.dequantized_weight(), pref)
    with pytest.raises(LowbitError, match="lo"):
        WeightOnlyLinear.from_linear(lin, spec, lo=lo[:, :1], hi=hi)


def test_rtn_observer_on_a_short_last_group():
    """576 inputs in groups of 128: the observer sees the four whole groups, then the group of 64 on its own."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 40, bias=False)
    w = lin.weight.detach()
    spec = QuantSpec(bits=4, group_size=128)
    layer = get_method("rtn", bits=4, group_size=128, observer="mse").quantize_linear(
        BlockContext(0, nn.Module(), LLAMA), "mlp.up_proj", lin, None).layer
    (lo0, hi0), (lo1, hi1) = observe(w[:, :512], spec, "mse"), observe(w[:, 512:], replace(spec, group_size=64), "mse")
    ref = WeightOnlyLinear.from_linear(lin, spec, lo=torch.cat([lo0, lo1], 1), hi=torch.cat([hi0, hi1], 1))
    assert torch.equal(layer.dequantized_weight(), ref.dequantized_weight())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_act_order_g_idx(mode):
    # GPTQ act-order: groups are formed over a permutation of the input columns.
    g, spec = 32, QuantSpec(bits=3, group_size=32, **MODES[mode])
    w = _linear(bias=False).weight.detach()
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(5))
    inv = torch.argsort(perm)
    ref = fake_quantize(w[:, perm], spec)[:, inv]  # quantized in permuted order, put back
    q, scale, zero = quantize_groups(w[:, perm], spec)  # codes [out, in] in permuted order
    g_idx = (torch.arange(IN) // g)[inv]  # column j sits at position inv[j] of the permutation
    layer = WeightOnlyLinear.from_quantized(q[:, inv], scale, None if spec.symmetric else zero, spec,
                                            g_idx=g_idx, dtype=torch.float32)
    assert layer.g_idx.dtype == torch.int32 and layer.g_idx.shape == (IN,)
    assert torch.equal(layer.dequantized_weight(), ref)
    # Contiguous groups again (identity g_idx) agree with the g_idx=None path.
    q2, s2, z2 = quantize_groups(w, spec)
    a = WeightOnlyLinear.from_quantized(q2, s2, z2 if not spec.symmetric else None, spec, dtype=torch.float32)
    b = WeightOnlyLinear.from_quantized(q2, s2, z2 if not spec.symmetric else None, spec,
                                        g_idx=torch.arange(IN) // g, dtype=torch.float32)
    assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


def test_from_quantized_rejects_bad_codes():
    spec = QuantSpec(bits=4, symmetric=True, group_size=32)
    q = torch.full((OUT, IN), 8, dtype=torch.int8)  # 8 is off the int4 symmetric grid [-8, 7]
    with pytest.raises(LowbitError, match="q_codes"):
        WeightOnlyLinear.from_quantized(q, torch.ones(OUT, IN // 32), None, spec)
    with pytest.raises(LowbitError, match="scale"):
        WeightOnlyLinear.from_quantized(q - 1, torch.ones(OUT, 3), None, spec)
    with pytest.raises(LowbitError, match="g_idx"):
        WeightOnlyLinear.from_quantized(q - 1, torch.ones(OUT, IN // 32), None, spec,
                                        g_idx=torch.full((IN,), IN // 32))
    with pytest.raises(LowbitError, match="zero"):
        WeightOnlyLinear.from_quantized(q.abs().to(torch.uint8), torch.ones(OUT, 8), None,
                                        QuantSpec(bits=4, group_size=32))


# ----------------------------------------------------------------------------- int8

def test_int8_mm_bit_exact():
    g = torch.Generator().manual_seed(2)
    for m, k, n in [(1, 64, 8), (5, 300, 7), (33, 1024, 24), (9, 2500, 5)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        ref = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
        out = int8_mm(a, b)  # CPU default: exact float32 slices of K
        assert out.dtype == torch.int32 and np.array_equal(out.numpy(), ref)
        assert np.array_equal(int8_mm(a, b, backend="fallback").numpy(), ref)  # integer mm
        assert np.array_equal(int8_mm(a, b, backend="int_mm").numpy(), ref)  # padding path, CPU _int_mm
    # Extremes: every product is (-128)^2 = 2^14, sums near the int32 limit stay exact.
    k = 8192
    a, b = torch.full((2, k), -128, dtype=torch.int8), torch.full((3, k), -128, dtype=torch.int8)
    assert int(int8_mm(a, b)[0, 0]) == k * 16384 == sum([16384] * k)
    assert int(int8_mm(a, b, backend="fallback")[0, 0]) == k * 16384


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_float64_formula(static, bias):
    lin = _linear(bias=bias)
    x = _x(2, 3, IN)
    act_scale = float(x.abs().max()) / 127 * 0.8 if static else None  # static scale clips a little
    layer = Int8Linear.from_linear(lin, act_scale=act_scale)
    assert layer.qweight.dtype == torch.int8 and layer.w_scale.shape == (OUT, 1)
    # float64 formula from the integer sum: act_scale * w_scale * acc + bias.
    x2 = x.reshape(-1, IN)
    qw, sw, _ = quantize_groups(lin.weight.detach(), INT8_SYM)
    if static:
        sx = torch.tensor([[act_scale]], dtype=torch.float32)  # stored as float32
        qx = quantize(x2, sx, 0, INT8_SYM)
    else:
        qx, sx = quantize_per_token(x2)
    acc = qx.numpy().astype(np.int64) @ qw.numpy().astype(np.int64).T  # [M, out]
    ref = torch.from_numpy(acc).double() * sx.double() * sw.reshape(1, -1).double()
    if bias:
        ref = ref + lin.bias.detach().double()
    y = layer(x)
    assert y.shape == (2, 3, OUT) and y.dtype == torch.float32
    err = (y.reshape(-1, OUT).double() - ref).abs()
    assert float(err.max()) <= 4 * 2 ** -24 * float(ref.abs().max())
    # ...and agrees with the fake-quant reference (float matmul of dequantized values).
    fake = FakeQuantLinear.from_linear(lin, INT8_SYM, act="int8", act_scale=act_scale)
    _close(y, fake(x), rtol=1e-5, atol=1e-5)


def test_int8_linear_half_input():
    layer = Int8Linear.from_linear(_linear())
    x = _x(4, IN)
    y16 = layer(x.half())
    assert y16.dtype == torch.float16
    _close(y16.float(), layer(x.half().float()), rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_emulation(per_channel, static):
    lin = _linear()
    x = _x(6, IN)
    act_scale = float(x.abs().max()) / 448 if static else None
    layer = FP8Linear.from_linear(lin, per_channel=per_channel, act_scale=act_scale)
    assert layer.qweight.dtype == torch.float8_e4m3fn
    assert layer.w_scale.shape == ((OUT, 1) if per_channel else (1, 1))
    qw, sw = fp8_quantize(lin.weight.detach(), "e4m3", per_channel=per_channel)
    qx, sx = fp8_quantize(x, "e4m3", scale=None if act_scale is None else torch.tensor(act_scale))
    ref = fp8_dequantize(qx, sx) @ fp8_dequantize(qw, sw).T + lin.bias.detach()
    assert torch.equal(layer(x), ref)
    fake = FakeQuantLinear.from_linear(lin, "fp8_channel" if per_channel else "fp8", act="fp8", act_scale=act_scale)
    _close(layer(x), fake(x), rtol=1e-6, atol=1e-6)


def test_half_keeps_format_buffers():
    layer = FP8Linear.from_linear(_linear()).half()
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.w_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    assert layer(_x(2, IN).half()).dtype == torch.float16


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("bits,limit", [(4, 0.3), (3, 0.21), (2, 0.15)])
def test_nbytes_shrinks(bits, limit):
    in_f, out_f = 1536, 576  # SmolLM2 down_proj (576 is not a multiple of 128, 1536 is)
    fp16 = 2 * 576 * 1536
    layer = WeightOnlyLinear(in_f, out_f, QuantSpec(bits=bits, group_size=128), bias=False)
    ratio = layer.nbytes() / fp16
    assert ratio <= limit, ratio
    assert layer.nbytes() == 576 * 1536 * bits // 8 + 2 * (2 * 576 * 12)  # codes + fp16 scale + zero
    sym = WeightOnlyLinear(in_f, out_f, QuantSpec(bits=bits, symmetric=True, group_size=128), bias=False)
    assert sym.nbytes() < layer.nbytes()  # no zero buffer
    assert Int8Linear(in_f, out_f, bias=False).nbytes() / fp16 < 0.51


def test_nbytes_matches_built_layer():
    lin = _linear(bias=True)
    spec = QuantSpec(bits=3, group_size=32)
    built = WeightOnlyLinear.from_linear(lin, spec)
    assert built.nbytes() == WeightOnlyLinear(IN, OUT, spec).nbytes() == OUT * IN * 3 // 8 + 2 * (2 * OUT * 8 + OUT)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=True, group_size=128), QuantSpec(bits=3, group_size=32),
                                  QuantSpec(bits=8, group_size=-1), QuantSpec(bits=2, symmetric=True, group_size=0)])
def test_fake_quant_format_bytes_equal_the_packed_layer(spec):
    """The simulation layer holds a float weight; the bits it reports are those of the real packed layer."""
    lin = _linear(bias=True)
    fake = FakeQuantLinear.from_linear(lin, spec, act="int8")
    assert fake.format_nbytes() == WeightOnlyLinear.from_linear(lin, spec).nbytes() < fake.nbytes()
    assert FakeQuantLinear.from_linear(lin, None).format_nbytes() == fake.nbytes()   # unquantized weight: as held
    assert FP8Linear.from_linear(lin, per_channel=True).format_nbytes() == FP8Linear.from_linear(lin, per_channel=True).nbytes()


# ----------------------------------------------------------------------------- state dict

CASES = {
    "weight_only": lambda lin: WeightOnlyLinear.from_linear(lin, QuantSpec(bits=3, group_size=32)),
    "weight_only_fzp": lambda lin: WeightOnlyLinear.from_linear(lin, QuantSpec(bits=4, zero_point="float")),
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "int8_static": lambda lin: Int8Linear.from_linear(lin, act_scale=0.03),
    "fp8": lambda lin: FP8Linear.from_linear(lin, per_channel=False, act_scale=0.01),
    "fake": lambda lin: FakeQuantLinear.from_linear(lin, QuantSpec(bits=4), act="int8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip(case, tmp_path):
    layer = CASES[case](_linear())
    sd = layer.state_dict()
    assert all(type(t) is torch.Tensor for t in sd.values())
    save_file(sd, str(tmp_path / "l.safetensors"))
    loaded = load_file(str(tmp_path / "l.safetensors"))
    cfg = layer.layer_config()
    assert LAYER_CLASSES[cfg["kind"]] is type(layer)
    x = _x(3, IN)
    empty = build_layer(cfg)  # empty buffers, same shapes
    empty.load_state_dict(loaded)
    assert torch.equal(empty(x), layer(x))
    meta = build_layer(cfg, device="meta")  # a loader that allocates nothing up front
    meta.load_state_dict(loaded, assign=True)
    assert torch.equal(meta(x), layer(x))
    assert repr(layer)  # extra_repr works


def test_weight_only_act_order_round_trip(tmp_path):
    spec = QuantSpec(bits=4, group_size=64)
    q, s, z = quantize_groups(_linear().weight.detach(), spec)
    layer = WeightOnlyLinear.from_quantized(q, s, z, spec, bias=torch.zeros(OUT), g_idx=torch.arange(IN) // 64)
    save_file(layer.state_dict(), str(tmp_path / "a.safetensors"))
    other = WeightOnlyLinear(IN, OUT, spec, act_order=True)
    other.load_state_dict(load_file(str(tmp_path / "a.safetensors")))
    assert torch.equal(other.dequantized_weight(), layer.dequantized_weight())
    assert "int4-asym-g64" in repr(other) and "act_order=True" in repr(other)


# ----------------------------------------------------------------------------- swap / errors

def test_swap_linear():
    model = nn.Sequential(nn.ModuleDict({"proj": _linear()}), nn.ModuleList([_linear(), nn.ReLU()]))
    x = _x(2, IN)
    new = WeightOnlyLinear.from_linear(model[1][0], QuantSpec(bits=8, group_size=-1))
    old = swap_linear(model, "1.0", new)
    assert isinstance(old, nn.Linear) and model[1][0] is new
    swap_linear(model, "0.proj", Int8Linear.from_linear(model[0]["proj"]))
    assert isinstance(model[0]["proj"], Int8Linear)
    _close(new(x), old(x), rtol=0.05, atol=0.05)
    with pytest.raises(LowbitError, match="name"):
        swap_linear(model, "0.nope", new)
    with pytest.raises(LowbitError, match="name"):
        swap_linear(model, "5.0", new)


def test_bad_inputs():
    lin = _linear()
    for bits in (1, 9, 16):
        with pytest.raises(LowbitError, match="bits"):
            WeightOnlyLinear.from_linear(lin, dict(bits=bits))
    with pytest.raises(LowbitError, match="group_size=512 is larger than in_features=256"):
        WeightOnlyLinear.from_linear(lin, QuantSpec(bits=4, group_size=512))
    with pytest.raises(LowbitError, match="group_size"):
        WeightOnlyLinear(IN, OUT, QuantSpec(bits=4, group_size=1024))
    with pytest.raises(LowbitError, match="in_features"):
        WeightOnlyLinear(0, OUT, QuantSpec())
    with pytest.raises(LowbitError, match="spec"):
        WeightOnlyLinear(IN, OUT, "int4")
    with pytest.raises(LowbitError, match="act"):
        FakeQuantLinear(IN, OUT, act="int4")
    with pytest.raises(LowbitError, match="kind"):
        build_layer({"kind": "gguf", "in_features": IN, "out_features": OUT})
    with pytest.raises(LowbitError, match="in_features"):
        Int8Linear.from_linear(lin)(_x(2, IN + 1))


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_paths_match_cpu():
    # Elementwise CUDA ops may differ from CPU by an ulp (a division by a Python scalar is a
    # reciprocal multiply there), which can flip a code; so each GPU path is checked against
    # the exact/emulated formula on the same GPU-quantized inputs.
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    for m, k, n in [(1, 64, 8), (16, 256, 48), (17, 256, 48), (40, 100, 30)]:  # pads M <= 16, K, N % 8
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        ref = int8_mm(a, b, backend="fallback")  # CPU int32 matmul
        assert torch.equal(int8_mm(a.to(dev), b.to(dev)).cpu(), ref)  # torch._int_mm
        assert torch.equal(int8_mm(a.to(dev), b.to(dev), backend="fallback").cpu(), ref)  # float64 path
    lin = _linear().to(dev)
    x = _x(2, 20, IN).to(dev)
    for act_scale in (None, 0.03):
        layer = Int8Linear.from_linear(lin, act_scale=act_scale)
        acc, sx = layer.int_accumulate(x)  # _int_mm
        qx = quantize_per_token(x.reshape(-1, IN))[0] if act_scale is None else \
            quantize(x.reshape(-1, IN), torch.tensor([[act_scale]], device=dev), 0, INT8_SYM)
        assert torch.equal(acc, int8_mm(qx, layer.qweight, backend="fallback"))
        ref = acc.double() * sx.double() * layer.w_scale.reshape(1, -1).double() + layer.bias.double()
        _close(layer(x).reshape(-1, OUT).double(), ref, rtol=1e-6, atol=1e-6)
        _close(layer(x), layer.cpu()(x.cpu()).to(dev), rtol=1e-2, atol=2e-2)  # CPU path, up to code flips
    if torch.cuda.get_device_capability() >= (8, 9):
        for per_channel in (True, False):
            layer = FP8Linear.from_linear(lin, per_channel=per_channel)
            qx, sx = fp8_quantize(x.reshape(-1, IN), "e4m3")
            emu = fp8_dequantize(qx, sx) @ fp8_dequantize(layer.qweight, layer.w_scale).T + layer.bias
            # torch._scaled_mm: Hopper's fp8 tensor cores accumulate with fewer bits than fp32
            # (seen on H100: about 2^-12 of the largest partial sum), not just in another order.
            _close(layer(x).reshape(-1, OUT), emu, rtol=0, atol=1e-3 * float(emu.abs().max()))
            assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    wo = WeightOnlyLinear.from_linear(lin, QuantSpec(bits=4, group_size=64))
    _close(wo(x), wo.cpu()(x.cpu()).to(dev), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym,zp", [(True, "int"), (False, "int"), (False, "float")])
def test_short_last_group_equals_groups_quantized_separately(sym, zp):
    """g=128 on 576 inputs (SmolLM2): four groups of 128 and one of 64, each exactly as if alone."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 40, bias=True)
    spec = QuantSpec(bits=4, group_size=128, symmetric=sym, zero_point=zp)
    layer = WeightOnlyLinear.from_linear(lin, spec)
    assert layer.scale.shape == (40, 5) and layer.g_idx.tolist() == [j // 128 for j in range(576)]
    w = lin.weight.detach()
    ref_head = FakeQuantLinear.from_linear(_with_weight(w[:, :512]), spec, scale_dtype=torch.float16).weight
    tail_spec = QuantSpec(bits=4, group_size=64, symmetric=sym, zero_point=zp)
    ref_tail = FakeQuantLinear.from_linear(_with_weight(w[:, 512:]), tail_spec, scale_dtype=torch.float16).weight
    assert torch.equal(layer.dequantized_weight(), torch.cat([ref_head, ref_tail], 1))
    from lowbit.kernels.primitives import to_groups
    with pytest.raises(LowbitError, match="group_size=128 does not divide"):
        to_groups(w, 128)  # the primitives stay strict; only the layer knows about a short last group


def _with_weight(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin
