"""Malformed Hugging Face and lowbit-quantized directories: each is a one-line LowbitError naming the file and
the field, within seconds, caught at load (not at the first forward); FIFOs are never opened.

The directories are written by the tests: a tiny random Llama as Hugging Face writes one (config.json +
model.safetensors), and a quantized one saved by lowbit (RTN 4-bit g128 with a ragged group, so g_idx, and one
layer of each other kind: int8 with a static activation scale, fp8, LLM.int8() with kept columns, fake-quant)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.config import ModelConfig
from lowbit.models.arch import config_to_hf
from lowbit.models.checkpoint import save_quantized
from lowbit.models.llama import LlamaForCausalLM
from lowbit.models.loader import load

CFG = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
B0, B1 = "model.layers.0.", "model.layers.1."


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random Llama written as a Hugging Face directory: config.json and model.safetensors."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(hidden_size=64, intermediate_size=128, **CFG))
    d = tmp_path_factory.mktemp("hf") / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def q_base(tmp_path_factory):
    """A lowbit-quantized directory of a small random Llama (in 256, ffn 320: down_proj's last group is short)."""
    from lowbit.layers import FakeQuantLinear, FP8Linear, Int8Linear, MixedInt8Linear, swap_linear
    from lowbit.quant.api import quantize

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(hidden_size=256, intermediate_size=320, **CFG))
    attn = copy.deepcopy(model.model.layers[1].self_attn)
    quantize(model, "rtn", None, progress=False, bits=4, group_size=128)
    swap_linear(model, B1 + "self_attn.q_proj", Int8Linear.from_linear(attn.q_proj, act_scale=torch.tensor([0.02])))
    swap_linear(model, B1 + "self_attn.k_proj", FP8Linear.from_linear(attn.k_proj))
    swap_linear(model, B1 + "self_attn.v_proj", MixedInt8Linear.from_linear(attn.v_proj, fp_cols=[3, 7, 11]))
    swap_linear(model, B1 + "self_attn.o_proj", FakeQuantLinear.from_linear(attn.o_proj, spec={"bits": 4}))
    return save_quantized(model, None, tmp_path_factory.mktemp("q") / "q", {"method": "rtn+"}, None)


@pytest.fixture
def copy_of(tmp_path):
    made = []

    def copy_dir(base: Path, name: str) -> Path:
        made.append(shutil.copytree(base, tmp_path / name))
        return made[-1]
    yield copy_dir
    for d in made:   # a reader stuck on a FIFO (a failed test) is released by opening the other end
        for f in d.iterdir():
            if f.is_fifo():
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass


# ----------------------------------------------------------------------------- edits

def put_json(name, value=None, raw: bytes | None = None):
    """Write file `name` as JSON `value` (or raw bytes)."""
    def edit(d):
        (d / name).write_bytes(raw if raw is not None else json.dumps(value).encode())
    return edit


def set_json(name, path: str, value=..., drop=False):
    """Set (or drop) a field of JSON file `name`; "/" in path goes down objects (module names keep their dots)."""
    def edit(d):
        obj = json.loads((d / name).read_text())
        *up, last = path.split("/")
        target = obj
        for k in up:
            target = target[k]
        if drop:
            del target[last]
        else:
            target[last] = value
        (d / name).write_text(json.dumps(obj))
    return edit


def set_tensor(key, fn=None, drop=False, add=None):
    """Change one tensor of model.safetensors (fn(tensor) -> tensor), drop it, or add {name: tensor}."""
    def edit(d):
        sd = load_file(str(d / "model.safetensors"))
        if drop:
            del sd[key]
        elif fn is not None:
            sd[key] = fn(sd[key].clone()).contiguous()
        sd.update(add or {})
        save_file(sd, str(d / "model.safetensors"))
    return edit


def setitem(idx, value):
    def fn(t):
        t[idx] = value
        return t
    return fn


def fifo(name):
    def edit(d):
        p = d / name
        if p.exists():
            p.unlink()
        os.mkfifo(p)
    return edit


def truncate(name, n):
    def edit(d):
        (d / name).write_bytes((d / name).read_bytes()[:n])
    return edit


CJ, IDX, ST = "config.json", "model.safetensors.index.json", "model.safetensors"
HF = {  # name: (edit(dir), file the error names ("." the directory), what it says)
    "config-null": (put_json(CJ, None), CJ, "expected an object at the top level, got null"),
    "config-list": (put_json(CJ, [1, 2]), CJ, "expected an object at the top level, got a list"),
    "config-bad-utf8": (put_json(CJ, raw=b'{"model_type": "\xff"}'), CJ, "not UTF-8 text (byte 16)"),
    "config-invalid-json": (put_json(CJ, raw=b'{"a": '), CJ, "not valid JSON"),
    "config-nested-100k": (put_json(CJ, raw=b"[" * 100_000), CJ, "JSON nested too deeply"),
    "config-fifo": (fifo(CJ), CJ, "not a regular file"),
    "layers-string": (set_json(CJ, "num_hidden_layers", "2"), CJ, "num_hidden_layers must be an integer, got '2'"),
    "layers-1e12": (set_json(CJ, "num_hidden_layers", 1e12), CJ,
                    "num_hidden_layers must be an integer, got 1000000000000.0"),
    "layers-10^12": (set_json(CJ, "num_hidden_layers", 10 ** 12), CJ,
                     "num_hidden_layers = 1000000000000 is outside the plausible range [1, 1024]"),
    "hidden-float": (set_json(CJ, "hidden_size", 64.0), CJ, "hidden_size must be an integer, got 64.0"),
    "heads-0": (set_json(CJ, "num_attention_heads", 0), CJ, "num_attention_heads = 0 is outside"),
    "heads-3": (lambda d: [set_json(CJ, k, 3)(d) for k in ("num_attention_heads", "num_key_value_heads")]
                + [set_json(CJ, "head_dim", drop=True)(d)], CJ,
                "hidden_size 64 is not divisible by num_attention_heads 3"),
    "kv-heads-3": (set_json(CJ, "num_key_value_heads", 3), CJ,
                   "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "head_dim-2^20": (set_json(CJ, "head_dim", 1 << 20), CJ, "head_dim = 1048576 is outside"),
    "eps-nan": (set_json(CJ, "rms_norm_eps", float("nan")), CJ, "rms_norm_eps must be a finite number"),
    "eps-negative": (set_json(CJ, "rms_norm_eps", -1e-5), CJ, "rms_norm_eps must be a finite number"),
    "theta-string": (set_json(CJ, "rope_theta", "1e4"), CJ,
                     "rope_theta must be a finite number in (0, 1e+12], got '1e4'"),
    "rope-scaling-list": (set_json(CJ, "rope_scaling", [1]), CJ, "field 'rope_scaling' must be an object, got list"),
    "rope-factor-string": (set_json(CJ, "rope_scaling", {"rope_type": "linear", "factor": "8"}), CJ,
                           "rope_scaling.factor must be a finite number"),
    "rope-type-bogus": (set_json(CJ, "rope_scaling", {"rope_type": "bogus", "factor": 2}), CJ,
                        "rope_scaling type 'bogus' is not supported"),
    "rope-orig-string": (set_json(CJ, "rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": None,
                                                       "original_max_position_embeddings": "8192"}), CJ,
                         "rope_scaling.original_max_position_embeddings must be an integer"),
    "eos-strings": (set_json(CJ, "eos_token_id", ["2"]), CJ, "eos_token_id must be an integer, got '2'"),
    "tie-string": (set_json(CJ, "tie_word_embeddings", "yes"), CJ, "tie_word_embeddings must be true or false"),
    "model_type-gpt2": (set_json(CJ, "model_type", "gpt2"), CJ, "unsupported architecture model_type='gpt2'"),
    "model_type-list": (set_json(CJ, "model_type", [1]), CJ, "unsupported architecture model_type=[1]"),
    "no-vocab_size": (set_json(CJ, "vocab_size", drop=True), CJ, "missing required key 'vocab_size'"),
    "vocab_size-500": (set_json(CJ, "vocab_size", 500), ST,
                       "tensor 'model.embed_tokens.weight' has shape (512, 64), config implies (500, 64)"),
    "index-null": (put_json(IDX, None), IDX, "expected an object at the top level, got null"),
    "index-bad-utf8": (put_json(IDX, raw=b"\xfe\xff"), IDX, "not UTF-8 text (byte 0)"),
    "index-weight_map-list": (put_json(IDX, {"weight_map": []}), IDX, "field 'weight_map' must be an object"),
    "index-weight_map-int": (put_json(IDX, {"weight_map": {"a": 3}}), IDX, "shard file names in this directory, got 3"),
    "index-weight_map-list-value": (put_json(IDX, {"weight_map": {"a": ["x"]}}), IDX, "got ['x']"),
    "index-weight_map-null-value": (put_json(IDX, {"weight_map": {"a": None}}), IDX, "got None"),
    "index-path-escape": (put_json(IDX, {"weight_map": {"a": "../model.safetensors"}}), IDX,
                          "got '../model.safetensors'"),
    "index-missing-shard": (put_json(IDX, {"weight_map": {"a": "other.safetensors"}}), IDX,
                            "lists shard other.safetensors, which is missing"),
    "st-fifo": (fifo(ST), ST, "not a regular file"),
    "st-dir": (lambda d: ((d / ST).unlink(), (d / ST).mkdir()), ST, "safetensors file is a directory"),
    "st-truncated": (truncate(ST, 5000), ST, "truncated or corrupt safetensors file"),
    "st-header-2^63": (lambda d: (d / ST).write_bytes(b"\xff" * 8 + (d / ST).read_bytes()[8:]), ST,
                       "truncated or corrupt safetensors file"),
    "st-int-weight": (set_tensor(B0 + "mlp.up_proj.weight", lambda t: t.to(torch.int32)), ST,
                      "is torch.int32, expected floating-point weights"),
    "st-missing": (set_tensor(B1 + "mlp.up_proj.weight", drop=True), ST, "missing tensor 'model.layers.1.mlp.up_proj"),
    "st-extra": (set_tensor(None, add={"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}), ST,
                 "unexpected tensor 'model.layers.2.mlp.up_proj.weight'"),
    "st-shape": (set_tensor(B0 + "self_attn.k_proj.weight", lambda t: t[:16]), ST, "has shape (16, 64)"),
    "no-weights": (lambda d: (d / ST).unlink(), ".", "no *.safetensors weights"),
    "pickle-only": (lambda d: ((d / ST).unlink(), (d / "pytorch_model.bin").write_bytes(b"\x80\x04")), ".",
                    "pickle checkpoints are not loaded"),
}




QC, DOWN = "quantization_config.json", B0 + "mlp.down_proj"
M = "modules/" + DOWN     # the down_proj layer config (weight_only, 4-bit asym int zero, g128 over 320 inputs)
QUANT = {  # name: (edit(dir), file the error names ("." the directory), what it says)
    "q-null": (put_json(QC, None), QC, "expected an object at the top level, got null"),
    "q-list": (put_json(QC, []), QC, "expected an object at the top level, got a list"),
    "q-bad-utf8": (put_json(QC, raw=b'{"format": "lowbit\xc3"}'), QC, "not UTF-8 text (byte 18)"),
    "q-format": (set_json(QC, "format", "gptq"), QC, "field 'format' must be 'lowbit', got 'gptq'"),
    "q-version-string": (set_json(QC, "format_version", "1"), QC,
                         "field 'format_version' must be an integer, got a string"),
    "q-version-99": (set_json(QC, "format_version", 99), QC, "format_version 99 is newer than this lowbit reads"),
    "q-modules-list": (set_json(QC, "modules", []), QC, "field 'modules' must be an object, got a list"),
    "q-module-string": (set_json(QC, M, "weight_only"), QC, f"modules['{DOWN}'] must be an object, got str"),
    "q-kv-int4": (set_json(QC, "kv_cache", "int4"), QC, "field 'kv_cache' must be int8, fp8 or null, got 'int4'"),
    "q-kind": (set_json(QC, M + "/kind", "int3"), QC, f"module {DOWN}: config kind must be one of"),
    "q-option": (set_json(QC, M + "/foo", 1), QC, f"module {DOWN}: config for 'weight_only'"),
    "q-bits-string": (set_json(QC, M + "/spec/bits", "4"), QC, "bits must be an integer in [2, 8], got '4'"),
    "q-bits-3": (set_json(QC, M + "/spec/bits", 3), ST,
                 f"tensor '{DOWN}.qweight' has shape (256, 160), config implies (256, 120)"),
    "q-group-4096": (set_json(QC, M + "/spec/group_size", 4096), QC, "group_size=4096 is larger than in_features=320"),
    "q-in-features": (set_json(QC, M + "/in_features", 321), QC,
                      f"module {DOWN}: the quantized layer maps 321 -> 256 features, the config implies 320 -> 256"),
    "q-dtype-int8": (set_json(QC, M + "/dtype", "int8"), QC, "dtype must be a floating torch dtype"),
    "q-symmetric": (set_json(QC, M + "/spec/symmetric", True), ST,
                    f"unexpected tensor '{DOWN}.zero' for a llama model (checkpoint and its quantization config"),
    "q-module-missing": (set_json(QC, "modules/model.layers.7.mlp.up_proj", {"kind": "int8", "in_features": 1,
                                                                            "out_features": 1}), QC,
                         "module model.layers.7.mlp.up_proj: name"),
    "q-module-norm": (set_json(QC, "modules/model.norm", {"kind": "int8", "in_features": 256, "out_features": 256}),
                      QC, "module model.norm is a RMSNorm in a llama model, not a Linear"),
    "g_idx-3": (set_tensor(DOWN + ".g_idx", setitem(5, 3)), ST,
                f"module {DOWN}: g_idx values must lie in [0, 3), got [0, 3]"),
    "g_idx-negative": (set_tensor(DOWN + ".g_idx", setitem(0, -1)), ST, "g_idx values must lie in [0, 3), got [-1, 2]"),
    "g_idx-float": (set_tensor(DOWN + ".g_idx", lambda t: t.float()), ST,
                    f"tensor '{DOWN}.g_idx' is torch.float32, expected torch.int32"),
    "qweight-int8": (set_tensor(DOWN + ".qweight", lambda t: t.to(torch.int8)), ST,
                     "is torch.int8, expected torch.uint8"),
    "zero-1.5": (set_tensor(DOWN + ".zero", setitem((0, 0), 1.5)), ST,
                 f"module {DOWN}: zero must hold integers in [0, 15] for int4-asym-g128"),
    "zero-300": (set_tensor(DOWN + ".zero", setitem((3, 1), 300)), ST, "zero must hold integers in [0, 15]"),
    "zero-missing": (set_tensor(DOWN + ".zero", drop=True), ST, f"missing tensor '{DOWN}.zero'"),
    "scale-0": (set_tensor(DOWN + ".scale", setitem((0, 0), 0)), ST, f"module {DOWN}: scale holds 1 value <= 0"),
    "scale-negative": (set_tensor(B0 + "mlp.up_proj.scale", lambda t: -t), ST, "scale holds 640 values <= 0"),
    "w_scale-negative": (set_tensor(B1 + "self_attn.q_proj.w_scale", setitem(0, -1.0)), ST,
                         f"module {B1}self_attn.q_proj: w_scale holds 1 value <= 0"),
    "act_scale-0": (set_tensor(B1 + "self_attn.q_proj.act_scale", setitem(0, 0.0)), ST, "act_scale holds 1 value <= 0"),
    "fp8-w_scale-0": (set_tensor(B1 + "self_attn.k_proj.w_scale", setitem(4, 0.0)), ST, "w_scale holds 1 value <= 0"),
    "fp_cols-256": (set_tensor(B1 + "self_attn.v_proj.fp_cols", setitem(2, 256)), ST,
                    f"module {B1}self_attn.v_proj: fp_cols must lie in [0, 256), got [3, 256]"),
    "fp_cols-repeat": (set_tensor(B1 + "self_attn.v_proj.fp_cols", setitem(1, 3)), ST, "fp_cols must be ascending"),
    "st-fifo": (fifo(ST), ST, "not a regular file"),
    "qconfig-fifo": (fifo(QC), QC, "not a regular file"),
    "st-missing": (lambda d: (d / ST).unlink(), ".", "model.safetensors is missing"),
    "st-truncated": (truncate(ST, 100_000), ST, "truncated or corrupt safetensors file"),
    "config-layers-1e12": (set_json(CJ, "num_hidden_layers", 1e12), CJ, "num_hidden_layers must be an integer"),
}


CASES = [("hf", c) for c in HF] + [("q", c) for c in QUANT]


@pytest.mark.parametrize("base,case", CASES, ids=[f"{b}:{c}" for b, c in CASES])
def test_malformed_dir(base, case, hf_base, q_base, copy_of, expect_error):
    d = copy_of(hf_base if base == "hf" else q_base, base)
    edit, name, says = (HF if base == "hf" else QUANT)[case]
    edit(d)
    expect_error(lambda: load(d, tokenizer=False), str(d / name), says)   # name "." : the directory


def test_quantized_dir_loads(q_base):
    model, _ = load(q_base, tokenizer=False)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("base,key,bad", [
    ("hf", B0 + "mlp.up_proj.weight", float("nan")),
    ("q", DOWN + ".scale", float("nan")),                        # a NaN scale: NaN weights in that group
    ("q", B1 + "self_attn.k_proj.qweight", float("nan")),        # an fp8 NaN code
    ("q", "model.norm.weight", float("inf")),
])
def test_nan_weights_warn_or_refuse(base, key, bad, hf_base, q_base, copy_of, run_limited, expect_error):
    d = copy_of(hf_base if base == "hf" else q_base, base)
    set_tensor(key, lambda t: t.index_put_((torch.tensor([1]),), torch.tensor(bad).to(t.dtype)))(d)
    model, err, warned, _ = run_limited(lambda: load(d, tokenizer=False))
    assert err is None, err
    assert any(w == f"{d / ST}: NaN or Inf in 1 tensor: {key}" for w in warned), warned
    expect_error(lambda: load(d, tokenizer=False, strict=True), f"{d / ST}: NaN or Inf in 1 tensor: {key}",
                 "refused: --strict")


@pytest.mark.parametrize("case", ["corrupt-tokenizer-json", "tokenizer-config-fifo"])
def test_hf_tokenizer(case, hf_base, copy_of, expect_error):
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = copy_of(hf_base, "hf")
    tk = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(d / "tokenizer.json"))
    if case == "corrupt-tokenizer-json":
        (d / "tokenizer.json").write_text('{"model": ')
        expect_error(lambda: load(d), f"{d}: cannot load the tokenizer (")
    else:
        fifo("tokenizer_config.json")(d)
        expect_error(lambda: load(d), f"{d / 'tokenizer_config.json'}: not a regular file")
