"""compressed-tensors export and import, checked by the compressed-tensors package and transformers themselves.

The model is the real SmolLM2 cut to 4 blocks (smollm2_4). Bounds: lowbit and transformers compute the same
dequantized fp32 weights ((q - z) * s with the stored scale) and the same fp32 graph; the max |logit
difference| measured here is 0.0 in every case (logits of magnitude ~30). LOGIT_BOUND = 1e-3 leaves room
for a library that changes its summation order, and is 16x below the 0.016 that merely rounding the
dequantized weights to fp16 causes (measured: the package's decompressor run on the fp16 scales).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import frozen_calib
from lowbit.errors import LowbitError
from lowbit.layers import FP8Linear, Int8Linear, WeightOnlyLinear
from lowbit.models.loader import load
from lowbit.quant.api import quantize

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

LOGIT_BOUND = 1e-3


def _ids():
    from helpers import frozen_test_ids
    return frozen_test_ids()[:96].reshape(1, 96)


def _quantized(smollm2_4, method, **opts):
    model = copy.deepcopy(smollm2_4[0])
    calib = frozen_calib(4, 64) if method != "rtn" else None
    quantize(model, method, calib, progress=False, **opts)
    return model


@pytest.fixture(scope="module")
def exported(smollm2_4, tmp_path_factory):
    """name -> (directory, the lowbit model it was written from)."""
    cases = {
        "w4sym_g64": ("rtn", dict(bits=4, group_size=64, sym=True)),
        "w4asym_g64": ("rtn", dict(bits=4, group_size=64)),
        "w8sym_ch": ("rtn", dict(bits=8, group_size=-1, sym=True)),
        "w4asym_ch": ("rtn", dict(bits=4, group_size=-1)),
        "w8a8": ("w8a8", {}),
        "fp8": ("fp8", {}),
    }
    out = {}
    for name, (method, opts) in cases.items():
        model = _quantized(smollm2_4, method, **opts)
        d = tmp_path_factory.mktemp(name) / "ckpt"
        model.save_pretrained(d, smollm2_4[1], method={"method": method, **opts}, format="compressed-tensors",
                              save_dtype="fp32")
        out[name] = (d, model)
    return out


def _qc(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]


def _hf(d):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


@torch.no_grad()
def _hf_logits(hf, ids):
    return hf(ids).logits[0]


@torch.no_grad()
def _lowbit_logits(d, ids):
    m, _ = load(d, dtype="fp32", tokenizer=False)
    return m(ids)[0], m


# ----------------------------------------------------------------------------- the config

@pytest.mark.parametrize("name,bits,typ,strategy,fmt,acts", [
    ("w4sym_g64", 4, "int", "group", "pack-quantized", None),
    ("w4asym_ch", 4, "int", "channel", "pack-quantized", None),
    ("w8a8", 8, "int", "channel", "int-quantized", ("int", "token", True)),
    ("fp8", 8, "float", "channel", "float-quantized", ("float", "tensor", True)),
])
def test_config_is_what_the_package_defines(exported, name, bits, typ, strategy, fmt, acts):
    qc = _qc(exported[name][0])
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in
                                                ("quant_method", "version", "sparsity_config", "transform_config")})
    (scheme,) = parsed.config_groups.values()
    assert scheme.targets == ["Linear"] and parsed.ignore == ["lm_head"]
    w = scheme.weights
    assert (w.num_bits, w.type, w.strategy) == (bits, typ, strategy)
    if strategy == "group":
        assert w.group_size == 64
    if acts is None:
        assert scheme.input_activations is None
    else:
        a = scheme.input_activations
        assert (a.type, a.strategy, a.dynamic, a.num_bits) == (*acts, 8)


# ----------------------------------------------------------------------------- the tensors

@pytest.mark.parametrize("name", ["w4sym_g64", "w4asym_g64", "w8sym_ch", "w4asym_ch", "w8a8", "fp8"])
def test_tensors_are_the_package_compressors_output(exported, name):
    """Every quantized Linear's tensors equal (names, shapes, dtypes, values) what the package's own
    compressor makes from the same weight, scale and zero point."""
    d, model = exported[name]
    sd = load_file(str(d / "model.safetensors"))
    qc = _qc(d)
    (scheme_d,) = qc["config_groups"].values()
    from compressed_tensors.quantization import QuantizationScheme
    scheme = QuantizationScheme.model_validate(scheme_d)
    compressor = BaseCompressor.load_from_registry(qc["format"])
    checked = 0
    for mod_name, layer in model.named_modules():
        if not isinstance(layer, (WeightOnlyLinear, Int8Linear, FP8Linear)):
            continue
        ours = {k[len(mod_name) + 1:]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == mod_name}
        ours.pop("bias", None)
        w = layer.dequantized_weight(torch.float32)  # [out, in]
        state = {"weight": w, "weight_scale": ours["weight_scale"]}
        if isinstance(layer, WeightOnlyLinear) and not layer.spec.symmetric:
            half = 1 << (layer.spec.bits - 1)
            state["weight_zero_point"] = (layer.zero.float().round() - half).to(torch.int8)
        if "input_scale" in ours:
            state["input_scale"] = ours["input_scale"]
        theirs = compressor.compress(state, scheme)
        assert sorted(theirs) == sorted(ours), (mod_name, sorted(theirs), sorted(ours))
        for k in theirs:
            assert theirs[k].dtype == ours[k].dtype and theirs[k].shape == ours[k].shape, (mod_name, k)
            assert torch.equal(theirs[k].view(torch.uint8) if theirs[k].dtype == torch.float8_e4m3fn else theirs[k],
                               ours[k].view(torch.uint8) if ours[k].dtype == torch.float8_e4m3fn else ours[k]), k
        checked += 1
    assert checked == 28


@pytest.mark.parametrize("name", ["w4sym_g64", "w4asym_g64", "w8sym_ch", "w8a8", "fp8"])
def test_export_import_round_trip_is_exact(exported, name):
    d, model = exported[name]
    back, _ = load(d, dtype="fp32", tokenizer=False)
    mods = dict(back.named_modules())
    n = 0
    for mod_name, layer in model.named_modules():
        if hasattr(layer, "layer_config"):
            twin = mods[mod_name]
            assert type(twin) is type(layer)
            for k, v in layer.state_dict().items():
                t = twin.state_dict()[k]
                assert t.dtype == v.dtype and torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t,
                                                          v.view(torch.uint8) if v.element_size() == 1 else v), k
            n += 1
    assert n == 28


# ----------------------------------------------------------------------------- transformers itself

@pytest.mark.parametrize("name", ["w4sym_g64", "w8sym_ch", "fp8"])
def test_transformers_logits_equal_lowbit(exported, name):
    """transformers (compressed-tensors on CPU: decompresses the weights, runs the activation quantization
    the config asks for) gives lowbit's logits on the same directory."""
    d, _ = exported[name]
    ids = _ids()
    ours, _ = _lowbit_logits(d, ids)
    theirs = _hf_logits(_hf(d), ids)
    assert (ours - theirs).abs().max().item() < LOGIT_BOUND


def _dense_via_package(d, out):
    """The directory decompressed by the package's own compressor: every quantized Linear's float weight."""
    from compressed_tensors.quantization import QuantizationScheme
    qc = _qc(d)
    (scheme_d,) = qc["config_groups"].values()
    scheme = QuantizationScheme.model_validate(scheme_d)
    comp = BaseCompressor.load_from_registry(qc["format"])
    sd = load_file(str(d / "model.safetensors"))
    mods = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")})
    for m in mods:
        local = {k.rsplit(".", 1)[1]: sd.pop(k) for k in list(sd) if k.rsplit(".", 1)[0] == m}
        bias = local.pop("bias", None)
        local["weight_scale"] = local["weight_scale"].float()   # as transformers holds it in an fp32 model
        dense = comp.decompress(local, scheme)
        sd[f"{m}.weight"] = dense["weight"].float()
        if bias is not None:
            sd[f"{m}.bias"] = bias
    from safetensors.torch import save_file
    out.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("name", ["w4asym_g64", "w4asym_ch"])
def test_asymmetric_through_the_package_decompressor(exported, name, tmp_path):
    """transformers 5.24 + compressed-tensors 0.20 cannot load an asymmetric pack-quantized checkpoint, not even
    one the package wrote itself (llm-compressor issue 1618: the packed zero points do not fit the empty model);
    vLLM reads them. So: the package's own decompressor unpacks our tensors, and transformers runs the dense
    result; its logits equal lowbit's."""
    d, _ = exported[name]
    ids = _ids()
    ours, _ = _lowbit_logits(d, ids)
    theirs = _hf_logits(_hf(_dense_via_package(d, tmp_path / "dense")), ids)
    assert (ours - theirs).abs().max().item() < LOGIT_BOUND


def test_w8a8_transformers_runs_the_configured_activation_quantization(exported):
    """transformers runs the config's per-token dynamic int8 activations with compressed-tensors' own step
    (absmax / 127.5, codes in [-128, 127]); lowbit's Int8Linear uses absmax / 127 in [-127, 127], as vLLM's
    kernel does. Layer by layer: transformers' output equals a float64 direct computation of the config's
    scheme on lowbit's exported weights."""
    d, model = exported["w8a8"]
    hf = _hf(d)
    hf(_ids())  # the first forward decompresses the weights
    torch.manual_seed(0)
    x = torch.randn(5, 576) * 3
    checked = 0
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.up_proj"):
        ours = model.get_submodule(name)
        with torch.no_grad():
            theirs = hf.get_submodule(name)(x[None])[0].double()   # [1, 5, 576] as in the model: tokens on dim 1
        s = x.double().abs().amax(-1, keepdim=True) / 127.5                               # [5, 1]
        qx = (x.double() / s).round().clamp(-128, 127) * s                                # [5, 576]
        want = qx @ ours.dequantized_weight(torch.float64).t()                            # [5, out]
        assert (theirs - want).abs().max().item() < 1e-4 * want.abs().max().item()
        checked += 1
    assert checked == 2


# ----------------------------------------------------------------------------- import of the package's own output

def _ct_written(hf_model, scheme_kw, fmt, d):
    """A directory written by the compressed-tensors package itself (its lifecycle, as llm-compressor runs it)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    w = QuantizationArgs(**scheme_kw["weights"])
    a = QuantizationArgs(**scheme_kw["input_activations"]) if "input_activations" in scheme_kw else None
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=w,
                                                                          input_activations=a)},
                            ignore=["lm_head"], format=fmt)
    apply_quantization_config(hf_model, qc)
    for _, mod in hf_model.named_modules():
        if hasattr(mod, "weight_scale"):
            W = mod.weight.data
            g = W.shape[1] if w.strategy == "channel" else w.group_size
            Wg = W.reshape(W.shape[0], -1, g)  # [out, G, g]
            s, z = calculate_qparams(Wg.amin(-1), Wg.amax(-1), w)
            mod.weight_scale.data.copy_(s.to(mod.weight_scale.dtype))
            if not w.symmetric:
                mod.weight_zero_point.data.copy_(z.round().to(mod.weight_zero_point.dtype))
    comp = ModelCompressor.from_pretrained_model(hf_model, fmt)
    comp.compress_model(hf_model)
    hf_model.save_pretrained(str(d))
    comp.update_config(str(d))
    return d


@pytest.fixture
def tiny_hf(smollm2_4):
    """transformers' LlamaForCausalLM holding smollm2_4's real weights (4 blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from lowbit.models.arch import config_to_hf
    cfg = LlamaConfig(**config_to_hf(smollm2_4[0].config))
    hf = LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in smollm2_4[0].state_dict().items() if "rotary" not in k}
    hf.load_state_dict(sd, strict=False)
    return hf


@pytest.mark.parametrize("case", ["w4sym_g64", "w4asym_g64", "w8a8_token", "fp8_token"])
def test_import_what_the_package_writes(tiny_hf, tmp_path, case):
    schemes = {
        "w4sym_g64": ({"weights": dict(num_bits=4, symmetric=True, strategy="group", group_size=64)},
                      "pack-quantized", WeightOnlyLinear),
        "w4asym_g64": ({"weights": dict(num_bits=4, symmetric=False, strategy="group", group_size=64)},
                       "pack-quantized", WeightOnlyLinear),
        "w8a8_token": ({"weights": dict(num_bits=8, symmetric=True, strategy="channel"),
                        "input_activations": dict(num_bits=8, symmetric=True, strategy="token", dynamic=True)},
                       "int-quantized", Int8Linear),
        "fp8_token": ({"weights": dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
                       "input_activations": dict(num_bits=8, type="float", symmetric=True, strategy="token",
                                                 dynamic=True)}, "float-quantized", FP8Linear),
    }
    kw, fmt, cls = schemes[case]
    d = _ct_written(tiny_hf, kw, fmt, tmp_path / "ct")
    ids = _ids()
    ours, m = _lowbit_logits(d, ids)
    assert isinstance(m.get_submodule("model.layers.2.mlp.down_proj"), cls)
    if case == "w4asym_g64":   # transformers cannot load the package's asymmetric output (see above)
        theirs = _hf_logits(_hf(_dense_via_package(d, tmp_path / "dense")), ids)
        assert (ours - theirs).abs().max().item() < LOGIT_BOUND
    elif case == "w8a8_token":   # the 127 vs 127.5 activation step (see above): weights compared exactly instead
        hf = _hf(d)
        hf(ids)
        for name in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
            assert torch.equal(m.get_submodule(name).dequantized_weight(torch.float32),
                               hf.get_submodule(name).weight.float())
    else:
        theirs = _hf_logits(_hf(d), ids)
        assert (ours - theirs).abs().max().item() < LOGIT_BOUND


# ----------------------------------------------------------------------------- what the format cannot hold

@pytest.mark.parametrize("method,opts,needle", [
    ("rtn", dict(bits=4, group_size=128), "not a multiple of --group-size 128"),
    ("rtn", dict(bits=4, group_size=64, zero_point="float"), "real-valued zero offset"),
    ("llm-int8", {}, "LLM.int8()"),
    ("zeroquant", {}, "fake-quant"),
])
def test_refusals_name_the_option_and_the_formats(smollm2_4, tmp_path, method, opts, needle):
    model = _quantized(smollm2_4, method, **opts)
    out = tmp_path / "out"
    with pytest.raises(LowbitError) as e:
        model.save_pretrained(out, None, method={"method": method}, format="compressed-tensors")
    msg = str(e.value)
    assert needle in msg and "--format" in msg and "\n" not in msg
    assert not out.exists()


def test_kv_cache_refused(smollm2_4, tmp_path):
    model = _quantized(smollm2_4, "rtn", bits=4, group_size=64, sym=True)
    with pytest.raises(LowbitError, match="kv_cache_scheme holds static"):
        model.save_pretrained(tmp_path / "o", None, method={}, format="compressed-tensors", kv_cache="int8")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- malformed hub directories

def _copy(d, tmp_path):
    import shutil
    out = tmp_path / "bad"
    shutil.copytree(d, out)
    return out


@pytest.mark.parametrize("edit,needle", [
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits="four"),
     "not a valid compressed-tensors config: field config_groups.group_0.weights.num_bits"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="float", num_bits=4, group_size=16),
     "is not one lowbit reads"),
    (lambda qc: qc.update(ignore=["Linear"]), "belongs to no config group"),
])
def test_bad_quantization_config_is_one_line(exported, tmp_path, edit, needle):
    d = _copy(exported["w4sym_g64"][0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError) as e:
        load(d, tokenizer=False)
    msg = str(e.value)
    assert needle in msg and str(d / "config.json") in msg and "\n" not in msg, msg


def test_missing_tensor_is_one_line(exported, tmp_path):
    from safetensors.torch import save_file
    d = _copy(exported["w4sym_g64"][0], tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight_shape"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"module model.layers.1.mlp.up_proj: missing tensor .*weight_shape$"):
        load(d, tokenizer=False)
