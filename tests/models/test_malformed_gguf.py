"""Malformed GGUF files, written from the real SmolLM2 file: each is a one-line LowbitError naming the file,
within seconds (never a raw exception, a hang, or garbage weights loaded silently).

Three sources: byte edits of the real file's header (the structure scan's cases), byte edits of a small GGUF
written from the real file's metadata and slices of its real tensors (layout cases), and that small file
rewritten with changed metadata (config cases)."""
from __future__ import annotations

import math
import os
import struct

import gguf
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.gguf_loader import gguf_tokenizer, open_gguf
from lowbit.models.loader import load, load_config

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
# the small model: d 64, 4 heads of 16, 2 kv heads, ffn 128, 2 blocks, vocab 64 (tied embeddings, as SmolLM2)
SMALL = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
         "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 64,
         "llama.rope.dimension_count": 16}


class Offsets:
    """Byte offsets of a GGUF file's header parts, found through gguf's reader (its parts view the file)."""

    def __init__(self, reader):
        self.r, self.base = reader, reader.data.ctypes.data

    def at(self, part) -> int:
        return part.ctypes.data - self.base

    def key(self, key):             # the key's length field
        return self.r.fields[key].offset

    def vtype(self, key):
        return self.at(self.r.fields[key].parts[2])

    def value(self, key):           # scalars: the value; arrays: the item type (count at +4, items at +12)
        return self.at(self.r.fields[key].parts[3])

    def item(self, key, i):         # the i-th string of a string array: its length field
        f = self.r.fields[key]
        return self.at(f.parts[f.data[i]]) - 8

    def tensor(self, name, part):   # part: 0 name length, 1 name, 2 n_dims, 3 dims, 4 type, 5 offset
        return self.at(next(t for t in self.r.tensors if t.name == name).field.parts[part])


def put(buf, fmt, off, *values):
    struct.pack_into("<" + fmt, buf, off, *values)


# ----------------------------------------------------------------------------- the small GGUF

def real_meta(real) -> dict:
    """The real file's scalar and string metadata (no arrays), with SMALL's sizes."""
    meta = {}
    for k, f in real.fields.items():
        if k.startswith("GGUF.") or f.types[0] == V.ARRAY:
            continue
        meta[k] = (f.contents(), f.types[0])
    meta.update({k: (v, V.UINT32) for k, v in SMALL.items()})
    return meta


def real_tensors(real) -> dict:
    """SMALL's tensors cut from the real ones (their first rows, first blocks): real Q8_0/Q4_1/F32 bytes."""
    t = {x.name: x.data for x in real.tensors}
    out = {"token_embd.weight": (t["token_embd.weight"][:64, :2 * 34], Q.Q8_0),
           "output_norm.weight": (t["output_norm.weight"][:64], None)}
    rows = {"attn_q": 64, "attn_k": 32, "attn_v": 32, "attn_output": 64, "ffn_gate": 128, "ffn_up": 128}
    for i in range(2):
        for n in ("attn_norm", "ffn_norm"):
            out[f"blk.{i}.{n}.weight"] = (t[f"blk.{i}.{n}.weight"][:64], None)
        for n, r in rows.items():
            out[f"blk.{i}.{n}.weight"] = (t[f"blk.{i}.{n}.weight"][:r, :2 * 20], Q.Q4_1)
        out[f"blk.{i}.ffn_down.weight"] = (t[f"blk.{i}.ffn_down.weight"][:64, :4 * 20], Q.Q4_1)
    return {k: (np.ascontiguousarray(a), q) for k, (a, q) in out.items()}


def write_gguf(path, meta: dict, tensors: dict, arrays: dict | None = None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].clear()                       # general.architecture comes from meta (maybe malformed)
    for k, (v, vt) in meta.items():
        w.add_key_value(k, v, vt)
    for k, (v, sub) in (arrays or {}).items():
        w.add_key_value(k, v, V.ARRAY, sub)
    for name, (arr, qt) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(real_gguf, tmp_path_factory):
    """(meta, tensors, path of the small file, its bytes, its offsets)."""
    meta, tensors = real_meta(real_gguf), real_tensors(real_gguf)
    path = write_gguf(tmp_path_factory.mktemp("small") / "small.gguf", meta, tensors)
    return meta, tensors, path, path.read_bytes(), Offsets(gguf.GGUFReader(path))


@pytest.fixture(scope="module")
def real_header(real_gguf):
    """The real file up to its data region (1.8 MB: metadata, vocabulary, tensor table) and its offsets."""
    first = min(t.data_offset for t in real_gguf.tensors)
    return bytes(real_gguf.data[:first]), Offsets(real_gguf)


def test_small_file_loads(small):
    model, _ = load(small[2], tokenizer=False)
    assert model.config.num_layers == 2 and torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


# ----------------------------------------------------------------------------- edits of the real header

def _bad_token(b, o):
    b[o.item("tokenizer.ggml.tokens", 1000) + 8] = 0xFF


REAL = {  # name: (edit(bytearray, Offsets), what the error says)
    "magic": (lambda b, o: b.__setitem__(slice(0, 4), b"GGML"), "not a GGUF file (magic bytes b'GGML'"),
    "version-1": (lambda b, o: put(b, "I", 4, 1), "GGUF version 1 is not supported"),
    "version-99": (lambda b, o: put(b, "I", 4, 99), "GGUF version 99 is not supported"),
    "big-endian": (lambda b, o: b.__setitem__(slice(4, 8), b"\0\0\0\3"), "big-endian GGUF file"),
    "tensor-count-2^63": (lambda b, o: put(b, "Q", 8, 1 << 63), "the tensor count is 9,223,372,036,854,775,808"),
    "kv-count-2^63": (lambda b, o: put(b, "Q", 16, 1 << 63), "the metadata count is"),
    "kv-count-plus-one": (lambda b, o: put(b, "Q", 16, 34), "truncated or corrupt GGUF file"),
    "key-length-2^63": (lambda b, o: put(b, "Q", 24, 1 << 63), "metadata key #0 is 9,223,372,036,854,775,808 bytes"),
    "key-not-utf8": (lambda b, o: b.__setitem__(o.key("llama.block_count") + 8, 0xC3), "metadata key #9 is not UTF-8"),
    "duplicate-key": (lambda b, o: b.__setitem__(slice(o.key("general.name") + 8, o.key("general.name") + 20),
                                                 b"general.type"), "metadata key 'general.type' appears twice"),
    "value-type-42": (lambda b, o: put(b, "I", o.vtype("llama.block_count"), 42), "has value type 42"),
    "string-length-2^40": (lambda b, o: put(b, "Q", o.value("general.name"), 1 << 40),
                           "metadata general.name at byte"),
    "array-count-2^63": (lambda b, o: put(b, "Q", o.value("tokenizer.ggml.tokens") + 4, 1 << 63),
                         "the length of metadata tokenizer.ggml.tokens is 9,223,372,036,854,775,808"),
    "array-count-2^20": (lambda b, o: put(b, "Q", o.value("tokenizer.ggml.token_type") + 4, 1 << 20),
                         "tokenizer.ggml.token_type is 1,048,576, more than the file holds"),
    "array-item-type-99": (lambda b, o: put(b, "I", o.value("tokenizer.ggml.tokens"), 99),
                           "tokenizer.ggml.tokens is an array of value type 99"),
    "token-not-utf8": (_bad_token, "metadata tokenizer.ggml.tokens[1000] is not UTF-8"),
    "merge-not-utf8": (lambda b, o: b.__setitem__(o.item("tokenizer.ggml.merges", 7) + 8, 0x80),
                       "metadata tokenizer.ggml.merges[7] is not UTF-8"),
    "token-length-2^62": (lambda b, o: put(b, "Q", o.item("tokenizer.ggml.tokens", 5), 1 << 62),
                          "tokenizer.ggml.tokens[5] at byte"),
    "tensor-name-length": (lambda b, o: put(b, "Q", o.tensor("blk.0.attn_q.weight", 0), 1 << 50),
                           "is 1,125,899,906,842,624 bytes long"),
    "tensor-name-not-utf8": (lambda b, o: b.__setitem__(o.tensor("output_norm.weight", 1), 0xFE), "is not UTF-8"),
    "duplicate-tensor": (lambda b, o: b.__setitem__(o.tensor("blk.1.attn_k.weight", 1) + 11, ord("q")),
                         "tensor blk.1.attn_q.weight appears twice"),
    "n-dims-0": (lambda b, o: put(b, "I", o.tensor("blk.3.attn_k.weight", 2), 0), "has 0 dimensions"),
    "n-dims-2^31": (lambda b, o: put(b, "I", o.tensor("blk.3.attn_k.weight", 2), 1 << 31), "dimensions (1 to 4)"),
    "dim-0": (lambda b, o: put(b, "Q", o.tensor("blk.2.ffn_down.weight", 3), 0), "has dims [0, 576]"),
    "dims-2^60": (lambda b, o: put(b, "QQ", o.tensor("token_embd.weight", 3), 1 << 30, 1 << 30),
                  "has dims [1073741824, 1073741824]"),
    "tensor-type-200": (lambda b, o: put(b, "I", o.tensor("blk.0.attn_v.weight", 4), 200),
                        "tensor blk.0.attn_v.weight has type 200, not a ggml tensor type"),
    "q4k-rows-of-576": (lambda b, o: put(b, "I", o.tensor("blk.0.attn_v.weight", 4), Q.Q4_K),
                        "Q4_K packs rows of a multiple of 256 values, its rows have 576"),
    "header-only": (lambda b, o: None, "ends past the end of the file"),
}


@pytest.mark.parametrize("case", list(REAL))
def test_real_header_edit(case, real_header, tmp_path, expect_error):
    data, offsets = real_header
    buf = bytearray(data)
    edit, says = REAL[case]
    edit(buf, offsets)
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(buf)
    expect_error(lambda: load(p), f"{p}: ", says)


# ----------------------------------------------------------------------------- edits of the small file's layout

def _type(name, qtype):
    return lambda b, o: put(b, "I", o.tensor(name, 4), qtype)


def _offset(name, delta=0, like=None, value=None):
    def edit(b, o):
        cur = struct.unpack_from("<Q", b, o.tensor(like or name, 5))[0]
        put(b, "Q", o.tensor(name, 5), value if value is not None else cur + delta)
    return edit


LAYOUT = {  # name: (edit(bytearray, Offsets) or a callable on the bytes, what the error says)
    "q4_1-as-q4_0": (_type("blk.0.attn_q.weight", Q.Q4_0),
                     "256 unused bytes between tensor blk.0.attn_q.weight and tensor blk.0.attn_k.weight"),
    "q4_1-as-q8_0": (_type("blk.0.attn_q.weight", Q.Q8_0),
                     "tensor blk.0.attn_k.weight at data offset"),
    "last-q4_1-as-q8_0": (_type("blk.1.ffn_down.weight", Q.Q8_0),
                          "tensor blk.1.ffn_down.weight (Q8_0 [128, 64]: 8,704 bytes"),
    "f32-as-f16": (_type("blk.0.attn_norm.weight", Q.F16), "unused bytes between tensor blk.0.attn_norm.weight"),
    "f32-as-i32": (_type("blk.0.attn_norm.weight", Q.I32), "blk.0.attn_norm.weight: unsupported GGUF tensor type I32"),
    "offset-misaligned": (_offset("blk.1.attn_v.weight", 1),
                          "blk.1.attn_v.weight's offset 32,513 is not a multiple of the alignment 32"),
    "offset-overlap": (_offset("blk.1.attn_v.weight", like="blk.1.attn_k.weight"), "overlaps tensor blk.1.attn_k"),
    "offset-2^60": (_offset("blk.0.ffn_up.weight", value=1 << 60),
                    "tensor blk.0.ffn_up.weight (Q4_1 [64, 128]: 5,120 bytes at data offset 1,152,921,504,606,846,976) "
                    "ends past the end of the file"),
    "rows-128-to-96": (lambda b, o: put(b, "Q", o.tensor("blk.0.ffn_gate.weight", 3) + 8, 96),
                       "unused bytes between tensor blk.0.ffn_gate.weight"),
    "dims-swapped": (lambda b, o: put(b, "QQ", o.tensor("blk.0.ffn_down.weight", 3), 64, 128),
                     "tensor 'model.layers.0.mlp.down_proj.weight' has shape (128, 64), config implies (64, 128)"),
    "k-dims-swapped": (lambda b, o: put(b, "QQ", o.tensor("blk.1.attn_k.weight", 3), 32, 64),
                       "tensor blk.1.attn_k.weight has 64 rows, the config implies 2 heads of 16"),
    "truncated-1-byte": (lambda b, o: b.__delitem__(-1), "ends past the end of the file"),
    "trailing-4096": (lambda b, o: b.extend(bytes(4096)), "4,096 bytes after the last tensor"),
    "empty": (lambda b, o: b.clear(), "not a GGUF file (the file is empty)"),
    "10-bytes": (lambda b, o: b.__delitem__(slice(10, None)), "10 bytes, a header needs 24"),
    "nan-scale-q8_0": (lambda b, o: None, None),   # below: weights, warned or refused
}


@pytest.mark.parametrize("case", [c for c in LAYOUT if LAYOUT[c][1]])
def test_small_layout_edit(case, small, tmp_path, expect_error):
    buf = bytearray(small[3])
    edit, says = LAYOUT[case]
    edit(buf, small[4])
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(buf)
    expect_error(lambda: load(p, tokenizer=False), f"{p}", says)


# ----------------------------------------------------------------------------- metadata: types, ranges, plausibility

A = "llama."
META = {  # name: ({key: (value, type) or None to drop}, what the error says)
    "block_count-2^32": ({A + "block_count": (1 << 32, V.UINT64)},
                         "GGUF metadata llama.block_count = 4294967296 is outside the plausible range [1, 1024]"),
    "block_count-1000": ({A + "block_count": (1000, V.UINT32)},
                         "llama.block_count = 1000, but the file holds tensors of blocks 0..1"),
    "block_count-string": ({A + "block_count": ("2", V.STRING)},
                           "GGUF metadata llama.block_count must be an integer, got STRING '2'"),
    "head_count-array": ({A + "attention.head_count": ([4, 4], V.ARRAY)},
                         "llama.attention.head_count must be an integer, got an array of 2 INT32"),
    "head_count-6": ({A + "attention.head_count": (6, V.UINT32), A + "attention.head_count_kv": (6, V.UINT32)},
                     "llama.embedding_length 64 is not divisible by llama.attention.head_count 6"),
    "head_count-0": ({A + "attention.head_count": (0, V.UINT32)},
                     "llama.attention.head_count = 0 is outside the plausible range"),
    "head_count_kv-3": ({A + "attention.head_count_kv": (3, V.UINT32)},
                        "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3"),
    "embedding_length--1": ({A + "embedding_length": (-1, V.INT32)}, "llama.embedding_length = -1 is outside"),
    "eps-nan": ({A + "attention.layer_norm_rms_epsilon": (math.nan, V.FLOAT32)},
                "llama.attention.layer_norm_rms_epsilon must be a finite number in (0, 1], got nan"),
    "eps-string": ({A + "attention.layer_norm_rms_epsilon": ("1e-5", V.STRING)},
                   "layer_norm_rms_epsilon must be a number, got STRING '1e-5'"),
    "freq_base--1": ({A + "rope.freq_base": (-1.0, V.FLOAT32)}, "llama.rope.freq_base must be a finite number"),
    "freq_base-inf": ({A + "rope.freq_base": (math.inf, V.FLOAT64)}, "llama.rope.freq_base must be a finite number"),
    "rope-scaling-bogus": ({A + "rope.scaling.type": ("bogus", V.STRING)},
                           "llama.rope.scaling type 'bogus' is not supported"),
    "rope-factor-nan": ({A + "rope.scaling.type": ("linear", V.STRING),
                         A + "rope.scaling.factor": (math.nan, V.FLOAT32)},
                        "llama.rope.scaling.factor must be a finite number"),
    "key_length-2^20": ({A + "attention.key_length": (1 << 20, V.UINT32)},
                        "llama.attention.key_length = 1048576 is outside"),
    "context_length-0": ({A + "context_length": (0, V.UINT32)}, "llama.context_length = 0 is outside"),
    "no-embedding_length": ({A + "embedding_length": None}, "GGUF metadata lacks llama.embedding_length"),
    "arch-gpt2": ({"general.architecture": ("gpt2", V.STRING)}, "unsupported architecture 'gpt2'"),
    "arch-uint32": ({"general.architecture": (7, V.UINT32)},
                    "GGUF metadata general.architecture must be a string, got UINT32 7"),
    "bos--5": ({"tokenizer.ggml.bos_token_id": (-5, V.INT32)}, "tokenizer.ggml.bos_token_id = -5 is outside"),
    "eos-array": ({"tokenizer.ggml.eos_token_id": ([2, 3], V.ARRAY)}, "tokenizer.ggml.eos_token_id must be an integer"),
    "vocab_size-100": ({A + "vocab_size": (100, V.UINT32)},
                       "tensor 'model.embed_tokens.weight' has shape (64, 64), config implies (100, 64)"),
    "alignment-3": ({"general.alignment": (3, V.UINT32)}, "general.alignment must be a UINT32 power of two"),
    "alignment-string": ({"general.alignment": ("32", V.STRING)}, "general.alignment must be a UINT32 power of two"),
    "alignment-64": ({"general.alignment": (64, V.UINT32)}, "ends past the end of the file"),  # data moved by 32
}


def _rewrite(small, tmp_path, name, changes, tensors=None, arrays=None):
    meta = dict(small[0])
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return write_gguf(tmp_path / f"{name}.gguf", meta, tensors or small[1], arrays)


@pytest.mark.parametrize("case", list(META))
def test_metadata(case, small, tmp_path, expect_error):
    changes, says = META[case]
    p = _rewrite(small, tmp_path, case, changes)
    msg = expect_error(lambda: load(p, tokenizer=False), f"{p}: ", says)
    assert msg.count(str(p)) == 1 and msg.count("GGUF metadata") <= 1, msg
    if case == "block_count-2^32":
        expect_error(lambda: load_config(p), f"{p}: ", says)


# ----------------------------------------------------------------------------- NaN/Inf, tokenizer, special files

def test_nan_weights_warn_or_refuse(small, tmp_path, run_limited, expect_error):
    tensors = dict(small[1])
    norm = tensors["blk.0.attn_norm.weight"][0].copy()
    norm[5] = np.nan
    tensors["blk.0.attn_norm.weight"] = (norm, None)
    emb = tensors["token_embd.weight"][0].copy()
    emb[3, 0:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)   # an Inf block scale
    tensors["token_embd.weight"] = (emb, Q.Q8_0)
    p = write_gguf(tmp_path / "nan.gguf", small[0], tensors)
    model, err, warned, _ = run_limited(lambda: load(p, tokenizer=False))
    assert err is None and model is not None
    assert any("NaN or Inf in 2 tensors: model.embed_tokens.weight, model.layers.0.input_layernorm.weight" in w
               for w in warned), warned
    expect_error(lambda: load(p, tokenizer=False, strict=True), f"{p}: NaN or Inf in 2 tensors", "--strict")


@pytest.mark.parametrize("case", ["tokens-int32", "model-bogus", "model-uint32"])
def test_tokenizer_metadata(case, small, real_gguf, tmp_path, private_cache, expect_error):
    tokens = real_gguf.fields["tokenizer.ggml.tokens"].contents()[:64]
    arrays = {"tokenizer.ggml.tokens": (list(range(64)), V.INT32) if case == "tokens-int32" else (tokens, V.STRING)}
    changes = {"tokenizer.ggml.model": ("bogus", V.STRING) if case == "model-bogus" else (3, V.UINT32)}
    p = _rewrite(small, tmp_path, case, {} if case == "tokens-int32" else changes, arrays=arrays)
    says = {"tokens-int32": "tokenizer.ggml.tokens must be a non-empty array of strings",
            "model-bogus": "cannot build the embedded tokenizer",
            "model-uint32": "GGUF metadata tokenizer.ggml.model must be a string, got UINT32 3"}[case]
    expect_error(lambda: load(p), f"{p}: ", says)


def test_fifo_named_gguf_is_never_opened(tmp_path, expect_error):
    p = tmp_path / "model.gguf"
    os.mkfifo(p)
    try:
        expect_error(lambda: load(p), f"{p}: GGUF file is not a regular file")
        expect_error(lambda: load_config(p), f"{p}: GGUF file is not a regular file")
        expect_error(lambda: gguf_tokenizer(open_gguf(p), p), "not a regular file")
    finally:   # a reader stuck on the FIFO (a failed test) is released by opening the other end
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_a_raised_error_is_a_lowbit_error(small, tmp_path):
    p = _rewrite(small, tmp_path, "short", {A + "block_count": (1 << 32, V.UINT64)})
    with pytest.raises(LowbitError):
        load(p)
