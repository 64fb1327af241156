"""GGUF export on the real SmolLM2: read back by the gguf package's own reader and dequantizer (the independent
reference) and by lowbit's loader; a lowbit quantized directory's codes reach the file without re-rounding."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.export.gguf_writer import export_gguf
from lowbit.models.loader import load

TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def _reader(path):
    import gguf
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def exports(smollm2, tmp_path_factory):
    """type -> (path, GGUFExport) of the default model exported at every supported type."""
    model, tok = smollm2
    d = tmp_path_factory.mktemp("gguf")
    return {t: (d / f"smollm2-{t}.gguf", export_gguf(model, tok, d / f"smollm2-{t}.gguf", type=t)) for t in TYPES}


@pytest.fixture(scope="module")
def windows(wiki_ids):
    return wiki_ids[:1024].view(2, 512)                       # [2, 512]: two WikiText-2 test windows


@pytest.fixture(scope="module")
def source_logits(smollm2, windows):
    with torch.no_grad():
        return smollm2[0](windows)                             # [2, 512, V]


@pytest.mark.parametrize("qtype", TYPES)
def test_metadata_and_tensor_types_as_gguf_reads_them(exports, smollm2, default_path, qtype):
    path, rep = exports[qtype]
    r, src = _reader(path), _reader(default_path)
    f = r.fields
    cfg = smollm2[0].config
    assert f["general.architecture"].contents() == "llama"
    expect = {"llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
              "llama.feed_forward_length": 1536, "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
              "llama.rope.dimension_count": 64, "llama.vocab_size": 49152,
              "general.file_type": {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype]}
    assert {k: f[k].contents() for k in expect} == expect
    assert f["llama.rope.freq_base"].contents() == pytest.approx(cfg.rope_theta) == 100000.0
    assert f["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    # the tokenizer carried over from the source file, value for value
    for key in [k for k in src.fields if k.startswith("tokenizer.")]:
        assert f[key].contents() == src.fields[key].contents(), key
    assert len(f["tokenizer.ggml.tokens"].contents()) == 49152 and "im_start" in f["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert len(types) == 272 and "output.weight" not in types          # tied head: the embedding serves
    head = "Q8_0" if qtype in ("Q4_0", "Q4_1") else qtype
    assert types["token_embd.weight"] == head
    for name, t in types.items():
        want = "F32" if name.endswith("norm.weight") else head if name == "token_embd.weight" else qtype
        assert t == want, name
    assert rep.tensor_types == {k: sum(v == k for v in types.values()) for k in set(types.values())}


def test_q4_1_export_of_the_q4_1_source_is_byte_identical(exports, default_path):
    """The source stores its Linears as Q4_1 and embeddings as Q8_0: gguf's quantizers put every dequantized
    weight back on the grid it came from, so the export reproduces every tensor's bytes (names and the q/k
    permutation included)."""
    out, src = _reader(exports["Q4_1"][0]), {t.name: t for t in _reader(default_path).tensors}
    assert sorted(t.name for t in out.tensors) == sorted(src)
    for t in out.tensors:
        assert t.tensor_type == src[t.name].tensor_type and np.array_equal(t.data, src[t.name].data), t.name


# Logits of lowbit's loader on the export against the source model, 2 x 512 WikiText-2 test tokens. Measured
# (2026-12-01): F32 and Q4_1 bit-identical; F16 max |diff| 0.075, KL 2.4e-6, top-1 99.9%; Q8_0 (the Q4_1 grid
# re-rounded to 8 bits) 2.06, KL 1.4e-3, top-1 97.6%; Q4_0 (re-rounded to another 4-bit grid) KL 0.31, top-1 72%.
BOUNDS = {"F16": (1e-4, 0.99), "Q8_0": (0.01, 0.95), "Q4_0": (0.6, 0.6)}    # (KL at most, top-1 at least)


@pytest.mark.parametrize("qtype", TYPES)
def test_lowbit_loads_the_export_with_measured_logit_error(exports, windows, source_logits, qtype):
    model, _ = load(exports[qtype][0], tokenizer=False)
    with torch.no_grad():
        out = model(windows)                                                    # [2, 512, V]
    if qtype in ("F32", "Q4_1"):
        assert torch.equal(out, source_logits)
        return
    lp, lr = F.log_softmax(out, -1), F.log_softmax(source_logits, -1)
    kl = (lr.exp() * (lr - lp)).sum(-1).mean().item()
    top1 = (out.argmax(-1) == source_logits.argmax(-1)).float().mean().item()
    max_kl, min_top1 = BOUNDS[qtype]
    assert 0 < kl < max_kl and top1 >= min_top1, (kl, top1)


GRIDS = [  # (rtn options, GGUF type, exact): the four lowbit grids that are GGUF block formats
    (dict(bits=4, group_size=32, sym=True), "Q4_0", True),
    (dict(bits=4, group_size=32, zero_point="float"), "Q4_1", True),
    (dict(bits=4, group_size=32, zero_point="int"), "Q4_1", False),   # m = -s*z rounded to fp16
    (dict(bits=8, group_size=32, sym=True), "Q8_0", True),
]


@pytest.fixture(scope="module")
def small(smollm2):
    """The real SmolLM2 cut to 2 blocks (real weights): quantizing and exporting it takes seconds."""
    model = copy.deepcopy(smollm2[0])
    model.model.layers = model.model.layers[:2]
    model.config = copy.deepcopy(model.config)
    model.config.num_layers = 2
    return model, smollm2[1]


def _quantized_dir(small, tmp_path, **opts):
    from lowbit.quant.api import quantize
    model = copy.deepcopy(small[0])
    quantize(model, "rtn", progress=False, **opts)
    model.save_pretrained(tmp_path / "q", small[1], method={"method": "rtn", **opts})
    return load(tmp_path / "q")


@pytest.mark.parametrize("opts,qtype,exact", GRIDS, ids=[g[1] + ("-int-zero" if not g[2] else "") for g in GRIDS])
def test_quantized_dir_codes_are_written_without_rerounding(small, default_path, tmp_path, opts, qtype, exact):
    import gguf
    from lowbit.models.gguf_loader import _unpermute

    model, tok = _quantized_dir(small, tmp_path, **opts)
    rep = export_gguf(model, tok, tmp_path / "q.gguf", type=qtype)
    assert rep.codes_kept == 14 and rep.requantized == 1               # 2 x 7 Linears; the tied head, float
    assert len(rep.constants_rounded) == (0 if exact else 14)
    r = _reader(tmp_path / "q.gguf")
    n = 0
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in LINEARS:
            continue
        assert t.tensor_type.name == qtype
        layer = model.get_submodule(f"model.layers.{parts[1]}.{LINEARS[parts[2]]}")
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))       # [out, in]
        if parts[2] in ("attn_q", "attn_k"):                  # back from llama.cpp's row order
            w = _unpermute(w, 9 if parts[2] == "attn_q" else 3)
        ref = layer.dequantized_weight(torch.float32)
        if exact:
            assert torch.equal(w, ref), t.name
        else:   # the offset -s*z rounded to fp16: at most half an fp16 ulp of it, per group
            m = (layer.scale.float() * layer.zero.float()).repeat_interleave(32, dim=1)      # [out, in]
            err = (w - ref).abs()
            assert bool((err <= m.abs() * 2.0 ** -11 + 1e-6).all()) and err.max() > 0, t.name
        n += 1
    assert n == 14
    # the tokenizer was built from the directory's HF tokenizer: the same vocabulary the source file holds
    src = _reader(default_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert r.fields[key].contents() == src.fields[key].contents(), key
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt2"   # transformers' conversion keeps no digit split


@pytest.mark.parametrize("opts,qtype,needle", [
    (dict(bits=4, group_size=128), "Q4_1", "int4-asym-g128 weight_only codes do not map to --type Q4_1"),
    (dict(bits=4, group_size=32, sym=True), "Q4_1", "int4-sym-g32 weight_only codes do not map to --type Q4_1"),
    (dict(bits=3, group_size=32, sym=True), "Q4_0", "int3-sym-g32 weight_only codes do not map to --type Q4_0"),
    (dict(bits=4, group_size=32, sym=True), "Q8_0", "do not map to --type Q8_0"),
])
def test_a_grid_that_is_not_the_type_is_refused_in_one_line(small, tmp_path, opts, qtype, needle):
    model, tok = _quantized_dir(small, tmp_path, **opts)
    with pytest.raises(LowbitError) as e:
        export_gguf(model, tok, tmp_path / "q.gguf", type=qtype)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.layers.0.self_attn.q_proj: its ") and needle in msg, msg
    assert [p.name for p in tmp_path.iterdir()] == ["q"]                 # nothing written, no temporary left


def test_quantized_layers_export_as_their_dequantized_weight_at_f32(small, tmp_path):
    model, tok = _quantized_dir(small, tmp_path, bits=3, group_size=64)
    rep = export_gguf(model, tok, tmp_path / "q.gguf", type="F32")
    assert rep.dequantized == 14
    back, _ = load(tmp_path / "q.gguf", tokenizer=False)
    for name, layer in model.named_modules():
        if hasattr(layer, "dequantized_weight") and hasattr(layer, "layer_config"):
            assert torch.equal(back.get_submodule(name).weight, layer.dequantized_weight(torch.float32)), name


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0"])
def test_unwritable_types_are_refused_before_anything_is_written(smollm2, tmp_path, qtype):
    with pytest.raises(LowbitError) as e:
        export_gguf(*smollm2, tmp_path / "x.gguf", type=qtype)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--type")
    if qtype in ("Q4_K", "Q6_K"):
        assert "can dequantize" in msg and "but not quantize it" in msg
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_without_force(smollm2, tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"keep")
    with pytest.raises(LowbitError, match="already exists"):
        export_gguf(*smollm2, p, type="Q8_0")
    assert p.read_bytes() == b"keep"
