"""ONNX export checked by its consumers: onnx.checker passes on every export, onnxruntime (CPU) runs it, its logits
match lowbit's on the same token ids, and greedy decoding through the exported KV-cache graph gives lowbit's tokens.

The float exports run on the whole real SmolLM2-135M; the quantized ones on its first 4 blocks (smollm2_4: real
weights, 7x faster to quantize and run), where every Linear kind and form is still exercised.
Bounds (measured on this 2-core x86 CPU, onnxruntime 1.32; each well above what was measured):
  fp32 float          max |Δlogit| / max |logit| 2.0e-6           -> 1e-4
  weight-only, fp32   3.7e-6 .. 6.7e-6 (the codes are the same)   -> 1e-4 (float summation order only)
  fp16                rel 1.4e-3, KL 7.5e-6 (lowbit's own fp16 vs fp32: 0.068 abs, KL 1.9e-5) -> 1e-2, 2e-4
  W8A8 per-token      qoperator max |Δ| 3.1e-5 (int32 sums exact); qdq KL 0.002 (a float matmul on the dequantized
                      codes flips a few downstream int8 codes; lowbit's own KL under a 1e-6 nudge of the embedding:
                      0.0056)                                      -> 1e-3, KL 0.02
  W8A8 "dynamic"      KL 0.22 (per-tensor uint8 activations, not lowbit's rounding: reported, bounded by 0.5)
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError
from lowbit.export.onnx_graph import check_exportable, export_onnx
from lowbit.export.onnx_run import OnnxDecoder
from lowbit.generate import generate
from lowbit.quant.api import quantize

PROMPT, NEW = 32, 16


@pytest.fixture(scope="module")
def ids(frozen_test_ids):
    return frozen_test_ids[:64].tolist()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) per position, in float64."""
    p = torch.log_softmax(torch.tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor(q_logits, dtype=torch.float64), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def _lowbit(model, ids) -> tuple[np.ndarray, list[int]]:
    """lowbit's logits [1, S, V] on ids, and its greedy tokens after the first PROMPT of them."""
    logits = model(torch.tensor([ids])).numpy()
    out, _ = generate(model, None, [ids[:PROMPT]], SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    return logits, out[0].token_ids


def _export(model, tmp_path, form="qdq", dtype="fp32", **kw) -> OnnxDecoder:
    rep = export_onnx(model, None, tmp_path / f"{form}-{dtype}", form=form, dtype=dtype, **kw)
    onnx.checker.check_model(str(rep["path"]))     # export ran it already; once more on the file as written
    # Level 1 keeps a fused 4-bit DQ->MatMul in fp32 (onnxruntime's default, 4, quantizes the activations).
    return OnnxDecoder(rep["path"], threads=2, qdq_accuracy_level=1)


# ----------------------------------------------------------------------------- float

def test_float_fp32_logits_and_greedy_equal_lowbit(smollm2, ids, tmp_path):
    model, _ = smollm2
    ref, ref_tokens = _lowbit(model, ids)
    dec = _export(model, tmp_path)
    logits, past = dec.forward(np.asarray([ids]))
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert past["past_key_values.29.value"].shape == (1, 3, len(ids), 64)
    assert _rel(logits, ref) < 1e-4
    # prefill + one decode step through the cache = the same last position as one full prefill
    _, p = dec.forward(np.asarray([ids[:-1]]))
    step, _ = dec.forward(np.asarray([ids[-1:]]), p)
    assert _rel(step[:, -1], ref[:, -1]) < 1e-4
    assert dec.generate(ids[:PROMPT], NEW, stop_at_eos=False).tokens == ref_tokens


def test_float_fp16_within_fp16_noise(smollm2, ids, tmp_path):
    model, _ = smollm2
    ref = model(torch.tensor([ids])).detach().numpy()
    logits, _ = _export(model, tmp_path, dtype="fp16").forward(np.asarray([ids]))
    assert _rel(logits, ref) < 1e-2 and _kl(ref, logits) < 2e-4
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


# ----------------------------------------------------------------------------- weight-only

WEIGHT_ONLY = {
    "w4-g32-sym": dict(bits=4, group_size=32, sym=True),
    "w4-g128-asym": dict(bits=4, group_size=128, sym=False),     # 576 = 4 x 128 + 64: a short last block
    "w4-g32-floatzero": dict(bits=4, group_size=32, sym=False, zero_point="float"),   # GGUF Q4_1's grid
    "w8-ch-sym": dict(bits=8, group_size=-1, sym=True),
    "w8-g64-asym": dict(bits=8, group_size=64, sym=False),
}
CASES = [("w4-g32-sym", "qdq"), ("w4-g32-sym", "qoperator"), ("w4-g128-asym", "qdq"), ("w4-g128-asym", "qoperator"),
         ("w4-g32-floatzero", "qoperator"), ("w8-ch-sym", "qdq"), ("w8-g64-asym", "qoperator")]
LAYER_CASES = CASES + [("w8-g64-asym", "qdq")]


@pytest.fixture(scope="module")
def quantized(smollm2_4):
    cache = {}

    def get(name: str):
        if name not in cache:
            m = copy.deepcopy(smollm2_4[0])
            if name == "w8a8":
                quantize(m, "w8a8", None, progress=False)
            else:
                quantize(m, "rtn", None, progress=False, **WEIGHT_ONLY[name])
            cache[name] = m
        return cache[name]
    return get


@pytest.fixture(scope="module")
def lowbit_ref(quantized, ids):
    """name -> lowbit's (logits, greedy tokens) of that quantized model, computed once for both forms."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _lowbit(quantized(name), ids)
        return cache[name]
    return get


@pytest.mark.parametrize("name,form", CASES)
def test_weight_only_logits_and_greedy_equal_lowbit(quantized, lowbit_ref, ids, tmp_path, name, form):
    model = quantized(name)
    ref, ref_tokens = lowbit_ref(name)
    dec = _export(model, tmp_path, form=form)
    logits, _ = dec.forward(np.asarray([ids]))
    assert _rel(logits, ref) < 1e-4
    assert dec.generate(ids[:PROMPT], NEW, stop_at_eos=False).tokens == ref_tokens


@pytest.mark.parametrize("name,form", [("w4-g32-sym", "qoperator"), ("w4-g128-asym", "qdq")])
def test_weight_only_fp16(quantized, ids, tmp_path, name, form):
    model = quantized(name)
    ref = model(torch.tensor([ids])).detach().numpy()
    logits, _ = _export(model, tmp_path, form=form, dtype="fp16").forward(np.asarray([ids]))
    assert _rel(logits, ref) < 1e-2 and _kl(ref, logits) < 2e-4


def _layer_session(layer, name: str, form: str, act_quant: str = "per-token"):
    """onnxruntime on one Linear as the export writes it (no graph optimisation: the nodes as written)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lowbit.export.onnx_builder import GraphBuilder
    from lowbit.export.onnx_quant import linear

    g = GraphBuilder("fp32", act_quant=act_quant)
    g.op("Identity", [linear(g, "x", layer, name, form)], "out", outputs=["y"])
    proto = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", layer.in_features])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", layer.out_features])], "t", "test")
    onnx.checker.check_model(proto)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0]


@pytest.mark.parametrize("name,form", LAYER_CASES)
def test_onnx_dequantized_weights_are_lowbits(quantized, name, form):
    """The identity matrix through the exported layer gives back its weight: the codes, scales and zero points
    were written as they are (no re-rounding)."""
    layers = quantized(name).model.layers[1]
    for lname, layer in (("q_proj", layers.self_attn.q_proj), ("down_proj", layers.mlp.down_proj)):
        run = _layer_session(layer, lname, form)
        w = run(np.eye(layer.in_features)).T                                  # [out, in]
        ref = layer.dequantized_weight().float().numpy()
        if layer.spec.float_zero:   # MatMulNBits' zero point -zero/scale is a rounded float: within a few ulps
            np.testing.assert_allclose(w, ref, rtol=0, atol=4e-7 * np.abs(ref).max())
        else:
            np.testing.assert_array_equal(w, ref)


# ----------------------------------------------------------------------------- W8A8

def test_w8a8_per_token_matches_lowbit(quantized, ids, tmp_path):
    model = quantized("w8a8")
    ref = model(torch.tensor([ids])).detach().numpy()
    qop, _ = _export(model, tmp_path, form="qoperator").forward(np.asarray([ids]))
    assert np.abs(qop - ref).max() < 1e-3          # int32 sums, then lowbit's scales: the same numbers
    qdq, _ = _export(model, tmp_path, form="qdq").forward(np.asarray([ids]))
    assert _kl(ref, qdq) < 0.02 and (qdq.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_w8a8_dynamic_is_onnxruntimes_rounding(quantized, ids, tmp_path):
    """DynamicQuantizeLinear (uint8, one scale per tensor) runs, but is not lowbit's per-token int8: measured."""
    model = quantized("w8a8")
    ref = model(torch.tensor([ids])).detach().numpy()
    dyn, _ = _export(model, tmp_path, form="qoperator", act_quant="dynamic").forward(np.asarray([ids]))
    tok, _ = _export(model, tmp_path / "t", form="qoperator").forward(np.asarray([ids]))
    assert _kl(ref, dyn) < 0.5 and _kl(ref, tok) < _kl(ref, dyn) / 100


def test_w8a8_layer_equals_lowbit_layer(quantized):
    layer = quantized("w8a8").model.layers[1].mlp.down_proj
    torch.manual_seed(0)
    x = torch.randn(16, layer.in_features) * torch.rand(16, 1) * 4
    x[3, 7] = 300.0                                  # an outlier row: per-token scales keep the others fine
    ref = layer(x).detach().numpy()
    for form in ("qdq", "qoperator"):
        assert np.abs(_layer_session(layer, "down_proj", form)(x.numpy()) - ref).max() < 1e-4 * np.abs(ref).max()


# ----------------------------------------------------------------------------- refusals

def _wo(spec: dict, in_f: int = 128, g_idx=None):
    from lowbit.layers import WeightOnlyLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, 32, bias=False)
    if g_idx is None:
        return WeightOnlyLinear.from_linear(lin, spec)
    layer = WeightOnlyLinear.from_linear(lin, spec)
    return WeightOnlyLinear.from_quantized(layer.codes(), layer.scale, layer.zero, spec, g_idx=g_idx)


@pytest.mark.parametrize("make,form,needle", [
    (lambda: _wo(dict(bits=3, group_size=32)), "qoperator", "3-bit codes: MatMulNBits is exported for 4 and 8 bits"),
    (lambda: _wo(dict(bits=3, group_size=32)), "qdq", "3-bit codes: ONNX opset 21 has 4- and 8-bit"),
    (lambda: _wo(dict(bits=4, group_size=32, zero_point="float")), "qdq", "a real-valued zero point"),
    (lambda: _wo(dict(bits=4, group_size=48)), "qoperator", "group size 48: MatMulNBits needs a power-of-two"),
    (lambda: _wo(dict(bits=4, group_size=-1)), "qoperator", "per-channel int4-asym-ch: MatMulNBits needs blocks"),
    (lambda: _wo(dict(bits=4, group_size=32), g_idx=torch.arange(128).flip(0) // 32), "qdq", "act-order g_idx"),
])
def test_what_does_not_map_is_refused_in_one_line(make, form, needle):
    from lowbit.export.onnx_quant import check_layer
    with pytest.raises(LowbitError) as e:
        check_layer("model.layers.0.mlp.up_proj", make(), form)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.layers.0.mlp.up_proj: cannot export as ONNX {form}: ")
    assert needle in msg, msg


def test_fp8_and_kv_cache_refused_and_nothing_written(smollm2_4, tmp_path):
    m = copy.deepcopy(smollm2_4[0])
    quantize(m, "fp8", None, progress=False)
    with pytest.raises(LowbitError, match=r"^model\.layers\.0\.self_attn\.q_proj: cannot export as ONNX qdq: fp8"):
        export_onnx(m, None, tmp_path / "o")
    m = copy.deepcopy(smollm2_4[0])
    from lowbit.layers.kv_quant import KVQuant
    m.set_kv_quant(KVQuant("int8"))
    with pytest.raises(LowbitError, match="quantized KV cache"):
        check_exportable(m, "qdq", "fp32")
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_existing_output_refused(smollm2_4, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        export_onnx(smollm2_4[0], None, tmp_path / "o")


def test_cli_export_of_a_quantized_directory_runs(quantized, smollm2_4, tmp_path, capsys):
    """lowbit export DIR --format onnx --form qoperator: the directory onnxruntime loads, with lowbit's logits."""
    from lowbit.cli.main import main
    from lowbit.models.loader import load

    from lowbit.quant.registry import get_method

    quantize_dir = tmp_path / "q"
    method = get_method("rtn", **WEIGHT_ONLY["w4-g32-sym"]).describe()
    quantized("w4-g32-sym").save_pretrained(quantize_dir, smollm2_4[1], method=method)
    assert main(["export", str(quantize_dir), "--format", "onnx", "--form", "qoperator", "-o",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "as ONNX qoperator fp32" in out and "MatMulNBits 28" in out and "onnx.checker passed" in out
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "o").iterdir()}
    reloaded, _ = load(quantize_dir, dtype="fp32")
    ids = list(range(100, 120))
    ref = reloaded(torch.tensor([ids])).detach().numpy()
    logits, _ = OnnxDecoder(tmp_path / "o").forward(np.asarray([ids]))
    assert _rel(logits, ref) < 1e-4
