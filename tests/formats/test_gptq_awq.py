"""lowbit.formats.gptq and lowbit.formats.awq: the hub's GPTQ (v1) and AWQ GEMM layouts.

The exported int32 tensors are decoded here by an independent numpy decoder written from the formats' documented
bit layouts (not the modules' own unpackers) and compared with the layers' codes, zero points and dequantized
weights; export -> import round trips are exact; every refusal is one line naming the option and the formats
that can hold it.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.formats import awq, get_format, gptq
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import FakeQuantLinear, FP8Linear, Int8Linear, MixedInt8Linear, WeightOnlyLinear, swap_linear
from lowbit.layers.kv_quant import KVQuant
from lowbit.models.llama import LlamaForCausalLM

IN, OUT = 256, 64
WHERE = "ckpt/config.json"

# ----------------------------------------------------------------------------- the layouts, from their docs
# GPTQ: qweight int32 [in*k/32, out], input r*p+j of word (r, o) in bits [j*k, (j+1)*k) (p = 32/k);
#       qzeros int32 [G, out*k/32], output c*p+j in field j, stored as the packed zeros minus a 1 in every field
#       (v1), modulo 2^32; scales [G, out]; g_idx [in].
# AWQ:  qweight int32 [in, out/8], output 8c + ORDER[k] of word (i, c) in nibble k; qzeros the same, as they are.
ONE_IN_EVERY_FIELD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _u32(t: torch.Tensor) -> np.ndarray:
    """int32 words as their unsigned 32-bit values (int64)."""
    assert t.dtype == torch.int32
    return t.numpy().astype(np.int64) & 0xFFFFFFFF


def gptq_decode_rows(qweight: torch.Tensor, bits: int) -> np.ndarray:
    """qweight [in/p, out] -> codes [in, out]: row r*p + j is field j of word row r."""
    w, p, mask = _u32(qweight), 32 // bits, (1 << bits) - 1
    out = np.empty((w.shape[0] * p, w.shape[1]), dtype=np.int64)
    for j in range(p):
        out[j::p] = (w >> (bits * j)) & mask
    return out


def gptq_decode_zeros(qzeros: torch.Tensor, bits: int) -> np.ndarray:
    """qzeros [G, out/p] (v1: minus one) -> zero points [G, out]: column c*p + j is field j of word column c."""
    w = (_u32(qzeros) + ONE_IN_EVERY_FIELD[bits]) & 0xFFFFFFFF
    p, mask = 32 // bits, (1 << bits) - 1
    out = np.empty((w.shape[0], w.shape[1] * p), dtype=np.int64)
    for j in range(p):
        out[:, j::p] = (w >> (bits * j)) & mask
    return out


def awq_decode_cols(packed: torch.Tensor) -> np.ndarray:
    """AWQ int32 [rows, out/8] -> 4-bit values [rows, out]: column 8c + ORDER[k] is nibble k of word column c."""
    w = _u32(packed)
    out = np.empty((w.shape[0], w.shape[1] * 8), dtype=np.int64)
    for k in range(8):
        out[:, AWQ_ORDER[k]::8] = (w >> (4 * k)) & 0xF
    return out


def dequantize_np(codes: np.ndarray, zeros: np.ndarray, scales: torch.Tensor, g_idx: np.ndarray) -> np.ndarray:
    """W [out, in] = scales[g_idx[i], o] * (codes[i, o] - zeros[g_idx[i], o]), in float32 (codes [in, out])."""
    s = scales.float().numpy()[g_idx]                                      # [in, out]
    return (s * (codes - zeros[g_idx]).astype(np.float32)).T


def _word(v: int) -> int:
    """An unsigned 32-bit literal as the int32 it is stored as."""
    return v - (1 << 32) if v >= 1 << 31 else v


# ----------------------------------------------------------------------------- layers and models

def _linear(out_f: int = OUT, in_f: int = IN, bias: bool = True, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin


def _layer(spec: QuantSpec, seed: int = 0, bias: bool = True, **kw) -> WeightOnlyLinear:
    return WeightOnlyLinear.from_linear(_linear(bias=bias, seed=seed, **kw), spec)


def _act_order_layer(spec: QuantSpec, seed: int = 0) -> WeightOnlyLinear:
    """GPTQ act-order: groups of group_size columns taken in a permuted order, g_idx naming each column's group."""
    lin = _linear(seed=seed)
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(seed + 100))
    permuted = nn.Linear(IN, OUT, bias=False)
    permuted.weight.data = lin.weight.data[:, perm].clone()
    q = WeightOnlyLinear.from_linear(permuted, spec)       # contiguous groups over the permuted columns
    inv = torch.argsort(perm)                               # original column j is permuted column inv[j]
    if spec.group_size == -1:                               # per channel: one group, act-order all the same
        return WeightOnlyLinear.from_quantized(q.codes()[:, inv], q.scale, q.zero, spec, lin.bias,
                                               g_idx=torch.zeros(IN, dtype=torch.int32))
    g_idx = (torch.arange(IN) // spec.group_size)[inv]
    layer = WeightOnlyLinear.from_quantized(q.codes()[:, inv], q.scale, q.zero, spec, lin.bias, g_idx=g_idx)
    assert layer.act_order and not torch.equal(layer.g_idx, torch.arange(IN, dtype=torch.int32) // spec.group_size)
    return layer


def _holder(**layers) -> nn.Module:
    """The smallest model the formats walk: named quantized Linears."""
    return nn.ModuleDict(layers)


def _tiny_llama(spec: QuantSpec, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention_bias=True, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]:
        swap_linear(model, name, WeightOnlyLinear.from_linear(model.get_submodule(name), spec))
    return model


GPTQ_SPECS = {
    "int4-sym-g64": QuantSpec(bits=4, symmetric=True, group_size=64),
    "int4-asym-g64": QuantSpec(bits=4, symmetric=False, group_size=64),
    "int4-asym-ch": QuantSpec(bits=4, symmetric=False, group_size=-1),
    "int4-sym-ch": QuantSpec(bits=4, symmetric=True, group_size=-1),
    "int8-sym-g64": QuantSpec(bits=8, symmetric=True, group_size=64),
    "int8-asym-ch": QuantSpec(bits=8, symmetric=False, group_size=-1),
    "int2-asym-g64": QuantSpec(bits=2, symmetric=False, group_size=64),
    "int2-sym-g32": QuantSpec(bits=2, symmetric=True, group_size=32),
}
AWQ_SPECS = {k: v for k, v in GPTQ_SPECS.items() if v.bits == 4}
AWQ_SPECS["int4-asym-g128"] = QuantSpec(bits=4, symmetric=False, group_size=128)


def _gptq_cases():
    cases = [pytest.param(lambda s=s: _layer(s, bias=i % 2 == 0), id=k) for i, (k, s) in enumerate(GPTQ_SPECS.items())]
    act = QuantSpec(bits=4, symmetric=False, group_size=64)
    cases.append(pytest.param(lambda: _act_order_layer(act), id="int4-asym-g64-act-order"))
    cases.append(pytest.param(lambda: _act_order_layer(QuantSpec(bits=8, symmetric=True, group_size=32), seed=3),
                              id="int8-sym-g32-act-order"))
    cases.append(pytest.param(lambda: _act_order_layer(QuantSpec(bits=4, symmetric=True, group_size=-1), seed=4),
                              id="int4-sym-ch-act-order"))
    return cases


# ----------------------------------------------------------------------------- GPTQ layout

@pytest.mark.parametrize("make", _gptq_cases())
def test_gptq_layout_against_an_independent_decoder(make):
    layer = make()
    spec, half = layer.spec, 1 << (layer.spec.bits - 1)
    qc, t = gptq.export(_holder(proj=layer))
    assert qc["bits"] == spec.bits and qc["sym"] == spec.symmetric
    assert qc["group_size"] == spec.group_size and qc["desc_act"] == layer.act_order
    groups = layer.scale.shape[1]
    assert t["proj.qweight"].dtype == torch.int32 and t["proj.qweight"].shape == (IN * spec.bits // 32, OUT)
    assert t["proj.qzeros"].dtype == torch.int32 and t["proj.qzeros"].shape == (groups, OUT * spec.bits // 32)
    assert t["proj.scales"].dtype == torch.float16 and t["proj.scales"].shape == (groups, OUT)
    assert t["proj.g_idx"].dtype == torch.int32 and t["proj.g_idx"].shape == (IN,)

    codes = gptq_decode_rows(t["proj.qweight"], spec.bits)                 # [in, out], unsigned
    zeros = gptq_decode_zeros(t["proj.qzeros"], spec.bits)                 # [G, out]
    want_codes = layer.codes().numpy().astype(np.int64) + (half if spec.symmetric else 0)
    np.testing.assert_array_equal(codes.T, want_codes)
    assert codes.min() >= 0 and codes.max() <= 2 ** spec.bits - 1
    if spec.symmetric:
        assert (zeros == half).all()
    else:
        np.testing.assert_array_equal(zeros.T, layer.zero.numpy().astype(np.int64))
    assert torch.equal(t["proj.scales"], layer.scale.t())
    g_idx = t["proj.g_idx"].numpy()
    if layer.g_idx is not None:
        np.testing.assert_array_equal(g_idx, layer.g_idx.numpy())
    elif spec.group_size > 0:
        np.testing.assert_array_equal(g_idx, np.arange(IN) // spec.group_size)
    else:
        assert (g_idx == 0).all()
    if layer.bias is not None:
        assert torch.equal(t["proj.bias"], layer.bias)
    else:
        assert "proj.bias" not in t
    np.testing.assert_array_equal(dequantize_np(codes, zeros, t["proj.scales"], g_idx),
                                  layer.dequantized_weight().numpy())


def test_gptq_words_by_hand():
    """Literal words: codes 0..15 along the input, the symmetric v1 zero 7 in every field, the v1 borrow of 0."""
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    q = (torch.arange(64) % 16).repeat(16, 1).to(torch.uint8)                # [16 out, 64 in]
    zero = torch.full((16, 2), 5.0)
    zero[0, 0] = 0                                                           # output 0, group 0: zero point 0
    zero[8:16, 1] = 0                                                        # outputs 8..15, group 1: all 0
    layer = WeightOnlyLinear.from_quantized(q, torch.full((16, 2), 0.5), zero, spec)
    _, t = gptq.export(_holder(proj=layer))
    assert t["proj.qweight"][0, 0].item() == 0x76543210                     # inputs 0..7 of output 0
    assert t["proj.qweight"][1, 0].item() == _word(0xFEDCBA98)              # inputs 8..15
    # zeros [5, 5, 5, 5, 5, 5, 5, 0] of outputs 7..0 = 0x55555550, minus 0x11111111
    assert t["proj.qzeros"][0, 0].item() == 0x4444443F
    assert t["proj.qzeros"][0, 1].item() == 0x44444444                      # all 5: 4 in every field
    assert t["proj.qzeros"][1, 1].item() == _word(0xEEEEEEEF)              # all 0: 0 - 0x11111111 mod 2^32
    sym = WeightOnlyLinear.from_quantized(q.to(torch.int16).sub(8).to(torch.int8), torch.full((16, 2), 0.5), None,
                                          QuantSpec(bits=4, symmetric=True, group_size=32))
    for bits, word in ((4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)):   # 2^(k-1) - 1 in every field
        s = QuantSpec(bits=bits, symmetric=True, group_size=32)
        codes = torch.zeros(16, 64, dtype=torch.int8)
        _, tk = gptq.export(_holder(proj=WeightOnlyLinear.from_quantized(codes, torch.ones(16, 2), None, s)))
        assert (tk["proj.qzeros"] == word).all(), bits
    _, ts = gptq.export(_holder(proj=sym))
    assert torch.equal(ts["proj.qweight"], t["proj.qweight"])              # c - 8 signed, + 8 again on export
    layers = gptq.import_layers({"bits": 4, "group_size": 32, "sym": False}, dict(t), WHERE)
    assert torch.equal(layers["proj"].zero, layer.zero)                     # the borrow undone


@pytest.mark.parametrize("make", _gptq_cases())
def test_gptq_round_trip(make):
    layer = make()
    qc, t = gptq.export(_holder(proj=layer))
    sd = dict(t)
    back = gptq.import_layers(qc, sd, WHERE)["proj"]
    assert not sd                                                           # every tensor taken
    _assert_same_layer(back, layer)


def _assert_same_layer(back: WeightOnlyLinear, layer: WeightOnlyLinear):
    assert back.spec == layer.spec and back.act_order == layer.act_order
    assert back.codes().dtype == layer.codes().dtype and torch.equal(back.codes(), layer.codes())
    assert back.scale.dtype == torch.float16 and torch.equal(back.scale, layer.scale)
    for name in ("zero", "g_idx", "bias"):
        a, b = getattr(back, name), getattr(layer, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(back(x), layer(x))


# ----------------------------------------------------------------------------- AWQ layout

@pytest.mark.parametrize("spec", list(AWQ_SPECS.values()), ids=list(AWQ_SPECS))
def test_awq_layout_against_an_independent_decoder(spec):
    layer = _layer(spec, seed=1)
    qc, t = awq.export(_holder(proj=layer))
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": spec.group_size, "bits": 4,
                  "version": "gemm", "modules_to_not_convert": None}
    groups = layer.scale.shape[1]
    assert set(t) == {"proj.qweight", "proj.qzeros", "proj.scales", "proj.bias"}
    assert t["proj.qweight"].dtype == torch.int32 and t["proj.qweight"].shape == (IN, OUT // 8)
    assert t["proj.qzeros"].dtype == torch.int32 and t["proj.qzeros"].shape == (groups, OUT // 8)
    assert t["proj.scales"].dtype == torch.float16 and t["proj.scales"].shape == (groups, OUT)
    codes = awq_decode_cols(t["proj.qweight"])                              # [in, out]
    zeros = awq_decode_cols(t["proj.qzeros"])                               # [G, out]
    want_codes = layer.codes().numpy().astype(np.int64) + (8 if spec.symmetric else 0)
    np.testing.assert_array_equal(codes.T, want_codes)
    if spec.symmetric:
        assert (zeros == 8).all()
    else:
        np.testing.assert_array_equal(zeros.T, layer.zero.numpy().astype(np.int64))
    assert torch.equal(t["proj.scales"], layer.scale.t()) and torch.equal(t["proj.bias"], layer.bias)
    gs = spec.group_size if spec.group_size > 0 else IN
    np.testing.assert_array_equal(dequantize_np(codes, zeros, t["proj.scales"], np.arange(IN) // gs),
                                  layer.dequantized_weight().numpy())


def test_awq_words_by_hand():
    """Output o's code o % 8 along a word: nibbles hold columns [0, 2, 4, 6, 1, 3, 5, 7]."""
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    q = (torch.arange(16) % 8 + torch.tensor([0] * 8 + [8] * 8)).unsqueeze(1).repeat(1, 32).to(torch.uint8)
    zero = torch.arange(16, dtype=torch.float32).unsqueeze(1)               # output o: zero point o
    layer = WeightOnlyLinear.from_quantized(q, torch.ones(16, 1), zero, spec)
    _, t = awq.export(_holder(proj=layer))
    assert t["proj.qweight"][0, 0].item() == 0x75316420
    assert t["proj.qweight"][0, 1].item() == _word(0xFDB9ECA8)
    assert t["proj.qzeros"].tolist() == [[0x75316420, _word(0xFDB9ECA8)]]   # stored as they are: no minus one


@pytest.mark.parametrize("spec", list(AWQ_SPECS.values()), ids=list(AWQ_SPECS))
def test_awq_round_trip(spec):
    layer = _layer(spec, seed=2, bias=spec.symmetric)
    qc, t = awq.export(_holder(proj=layer))
    sd = dict(t)
    back = awq.import_layers(qc, sd, WHERE)["proj"]
    assert not sd
    _assert_same_layer(back, layer)


# ----------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("fmt,spec", [("gptq", QuantSpec(bits=4, symmetric=False, group_size=32)),
                                      ("gptq", QuantSpec(bits=8, symmetric=True, group_size=-1)),
                                      ("awq", QuantSpec(bits=4, symmetric=True, group_size=32))],
                         ids=["gptq-int4-asym-g32", "gptq-int8-sym-ch", "awq-int4-sym-g32"])
def test_model_round_trip_same_logits(fmt, spec):
    model = _tiny_llama(spec)
    qc, t = get_format(fmt).export(model)
    assert len({k.rsplit(".", 1)[0] for k in t}) == 14                     # 2 blocks x 7 Linears
    sd = dict(t)
    layers = get_format(fmt).import_layers(qc, sd, WHERE)
    assert not sd and len(layers) == 14
    back = copy.deepcopy(model)
    for name, layer in layers.items():
        _assert_same_layer(layer, model.get_submodule(name))
        swap_linear(back, name, layer)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_saved_directory_loads_back(fmt, tmp_path):
    """lowbit's own writer and loader over the format: config.json's quantization_config, the same logits."""
    import json

    from lowbit.models.checkpoint import save_quantized
    from lowbit.models.loader import load

    model = _tiny_llama(QuantSpec(bits=4, symmetric=False, group_size=32), seed=1)
    out = save_quantized(model, None, tmp_path / "out", method={"method": "rtn"}, calibration=None, format=fmt,
                         save_dtype=None)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    loaded, _ = load(out, dtype="fp32", tokenizer=False)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_symmetric_and_asymmetric_layers_share_an_awq_checkpoint():
    """AWQ stores a zero point for every layer: symmetric ones go as zero 8 and come back symmetric."""
    sym, asym = _layer(AWQ_SPECS["int4-sym-g64"], seed=4), _layer(AWQ_SPECS["int4-asym-g64"], seed=5)
    qc, t = awq.export(_holder(a=sym, b=asym))
    layers = awq.import_layers(qc, dict(t), WHERE)
    _assert_same_layer(layers["a"], sym)
    _assert_same_layer(layers["b"], asym)


# ----------------------------------------------------------------------------- refusals

def _one_line_error(fn, *needles: str) -> str:
    with pytest.raises(LowbitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def _w8a8(cls, **kw):
    return lambda: _holder(proj=cls.from_linear(_linear(), **kw))


def _with_kv(spec):
    def make():
        model = _tiny_llama(spec)
        model.set_kv_quant(KVQuant("int8"))
        return model
    return make


G64 = QuantSpec(bits=4, symmetric=False, group_size=64)
REFUSED_BY_BOTH = {
    "per-tensor": (lambda: _holder(proj=_layer(QuantSpec(bits=4, group_size=0))),
                   ("--group-size 0", "--format compressed-tensors or lowbit")),
    "float-zero": (lambda: _holder(proj=_layer(QuantSpec(bits=4, group_size=64, zero_point="float"))),
                   ("--zero-point float", "--format lowbit")),
    "3-bit": (lambda: _holder(proj=_layer(QuantSpec(bits=3, group_size=64))),
              ("--bits 3", "--format compressed-tensors or lowbit")),
    "short-last-group": (lambda: _holder(proj=_layer(QuantSpec(bits=4, group_size=64), in_f=96)),
                         ("in_features=96", "--group-size 64", "--format lowbit")),
    "out-not-multiple": (lambda: _holder(proj=_layer(G64, out_f=36)), ("out_features=36", "compressed-tensors")),
    "int8-w8a8": (_w8a8(Int8Linear), ("W8A8 int8", "weight-only", "--format compressed-tensors")),
    "fp8": (_w8a8(FP8Linear), ("W8A8 fp8", "--format compressed-tensors")),
    "llm-int8": (_w8a8(MixedInt8Linear), ("--method llm_int8", "--format lowbit")),
    "fake-quant": (lambda: _holder(proj=FakeQuantLinear.from_linear(_linear(), G64)),
                   ("fake-quant", "--format lowbit")),
    "kv-cache": (_with_kv(G64), ("--kv-cache int8", "--format lowbit")),
    "fp32-scales": (lambda: _holder(proj=WeightOnlyLinear.from_linear(_linear(), G64, dtype=torch.float32)),
                    ("float32", "fp16", "--format compressed-tensors or lowbit")),
    "nothing-quantized": (lambda: _holder(proj=_linear()), ("no quantized layers",)),
}
REFUSED_BY_GPTQ = {
    "5-bit": (lambda: _holder(proj=_layer(QuantSpec(bits=5, group_size=64))), ("--bits 5", "compressed-tensors")),
    "mixed-specs": (lambda: _holder(a=_layer(G64), b=_layer(QuantSpec(bits=8, symmetric=True, group_size=64))),
                    ("int4-asym-g64", "int8-sym-g64", "--format compressed-tensors or lowbit")),
    "mixed-sym": (lambda: _holder(a=_layer(G64), b=_layer(QuantSpec(bits=4, symmetric=True, group_size=64))),
                  ("sym", "--format compressed-tensors or lowbit")),
}
REFUSED_BY_AWQ = {
    "8-bit": (lambda: _holder(proj=_layer(QuantSpec(bits=8, group_size=64))), ("--bits 8", "compressed-tensors")),
    "2-bit": (lambda: _holder(proj=_layer(QuantSpec(bits=2, group_size=64))), ("--bits 2", "compressed-tensors")),
    "act-order": (lambda: _holder(proj=_act_order_layer(G64)), ("--act-order", "--format gptq or lowbit")),
    "mixed-group-size": (lambda: _holder(a=_layer(G64), b=_layer(QuantSpec(bits=4, group_size=32))),
                         ("group size", "--format compressed-tensors or lowbit")),
}


def _refusals(fmt, own):
    cases = {**REFUSED_BY_BOTH, **own}
    return [pytest.param(fmt, make, needles, id=f"{fmt}-{k}") for k, (make, needles) in cases.items()]


@pytest.mark.parametrize("fmt,make,needles", _refusals("gptq", REFUSED_BY_GPTQ) + _refusals("awq", REFUSED_BY_AWQ))
def test_refusals_are_one_line_naming_the_option_and_formats(fmt, make, needles):
    model = make()
    msg = _one_line_error(lambda: get_format(fmt).export(model), f"--format {fmt}", *needles)
    assert msg.startswith(f"--format {fmt}:")


# ----------------------------------------------------------------------------- import errors

def _gptq_sd():
    qc, t = gptq.export(_holder(proj=_layer(G64)))
    return qc, dict(t)


@pytest.mark.parametrize("change,needles", [
    (lambda qc, sd: qc.update(bits=3), ("'bits'", "3-bit")),
    (lambda qc, sd: qc.update(bits="4"), ("'bits'", "an integer")),
    (lambda qc, sd: qc.update(group_size=0), ("'group_size'",)),
    (lambda qc, sd: qc.update(sym="yes"), ("'sym'",)),
    (lambda qc, sd: qc.update(checkpoint_format="marlin"), ("'checkpoint_format'", "marlin")),
    (lambda qc, sd: qc.update(pack_dtype="int16"), ("'pack_dtype'",)),
    (lambda qc, sd: qc.update(dynamic={"-:.*": {}}), ("'dynamic'",)),
    (lambda qc, sd: sd.pop("proj.qzeros"), ("proj.qzeros", "missing")),
    (lambda qc, sd: sd.update({"proj.qweight": sd["proj.qweight"].to(torch.int64)}), ("proj.qweight", "int32")),
    (lambda qc, sd: sd.update({"proj.scales": sd["proj.scales"][:1]}), ("proj.scales", "shape")),
    (lambda qc, sd: sd.update({"proj.g_idx": sd["proj.g_idx"][:-1]}), ("proj.g_idx", "shape")),
    (lambda qc, sd: sd.update({"proj.g_idx": sd["proj.g_idx"] + 7}), ("proj", "g_idx values")),
], ids=["bits-3", "bits-str", "group-size-0", "sym-str", "marlin", "pack-dtype", "dynamic", "no-qzeros",
        "qweight-int64", "scales-shape", "g_idx-shape", "g_idx-range"])
def test_gptq_import_errors_name_the_file_and_field(change, needles):
    qc, sd = _gptq_sd()
    change(qc, sd)
    msg = _one_line_error(lambda: gptq.import_layers(qc, sd, WHERE), *needles)
    assert msg.startswith(WHERE)


@pytest.mark.parametrize("change,needles", [
    (lambda qc, sd: qc.update(bits=8), ("'bits'", "4")),
    (lambda qc, sd: qc.update(version="gemv"), ("'version'", "gemv")),
    (lambda qc, sd: qc.update(zero_point=False), ("'zero_point'",)),
    (lambda qc, sd: sd.update({"proj.qzeros": sd["proj.qzeros"][:, :3]}), ("proj.qzeros", "shape")),
], ids=["bits-8", "gemv", "no-zero-point", "qzeros-shape"])
def test_awq_import_errors_name_the_file_and_field(change, needles):
    qc, t = awq.export(_holder(proj=_layer(G64)))
    sd = dict(t)
    change(qc, sd)
    msg = _one_line_error(lambda: awq.import_layers(qc, sd, WHERE), *needles)
    assert msg.startswith(WHERE)


def test_gptq_v2_and_a_missing_g_idx_are_read():
    """gptqmodel's checkpoint_format gptq_v2 stores the zero points as they are; old files may lack g_idx."""
    layer = _layer(G64, seed=6)
    qc, t = gptq.export(_holder(proj=layer))
    sd = dict(t)
    sd["proj.qzeros"] = gptq.pack_qzeros(layer.zero.t().round().to(torch.int16), 4, v1=False)
    del sd["proj.g_idx"]
    _assert_same_layer(gptq.import_layers({**qc, "checkpoint_format": "gptq_v2"}, sd, WHERE)["proj"], layer)
