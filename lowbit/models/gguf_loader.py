"""Read a GGUF file (llama.cpp's format): config from its metadata, dequantized weights, embedded tokenizer."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.config import ModelConfig, rename_fields
from lowbit.errors import LowbitError, first_line
from lowbit.models.arch import arch_for_gguf, arch_of
from lowbit.models.gguf_check import SCALARS, STRING, TYPE_NAMES, GGUFArray, GGUFLayout, TensorInfo, scan_gguf
from lowbit.models.gguf_dequant import dequantize


@dataclass
class GGUFFile:
    """A checked GGUF file: its scanned layout (metadata values, tensor table) and the file memory-mapped."""
    path: Path
    layout: GGUFLayout
    data: np.ndarray      # uint8 memmap of the whole file

    def tensor_data(self, t: TensorInfo) -> np.ndarray:
        """A tensor's bytes as `gguf.GGUFReader` exposes them: float/int types as that numpy dtype in torch
        order, block types (and BF16) as uint8 [..., bytes per row]. The scan checked the byte range."""
        import gguf

        shape = tuple(reversed(t.dims))
        raw = self.data[self.layout.data_offset + t.offset:][:t.nbytes]
        if t.type_name in _PLAIN:
            return raw.view(np.dtype(_PLAIN[t.type_name]).newbyteorder("<")).reshape(shape)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]]
        return raw.reshape(*shape[:-1], shape[-1] // block * size)


_PLAIN = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


def open_gguf(path: str | Path) -> GGUFFile:
    """The file's structure checked (gguf_check.scan_gguf: counts bounded, strings decoded, tensors tiling the
    data region), then memory-mapped; a one-line LowbitError saying why the file is not usable otherwise.
    (gguf.GGUFReader is not used: it trusts the counts, and walks a vocabulary item by item for seconds.)"""
    path = Path(path)
    layout = scan_gguf(path)
    try:
        data = np.memmap(path, mode="r")
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read the GGUF file ({first_line(e)})") from None
    return GGUFFile(path, layout, data)


# metadata value types by their struct code (gguf_check.SCALARS): integers, and floats
_INTS = {t for t, code in SCALARS.items() if code in "BbHhIiQq"}
_FLOATS = {t for t, code in SCALARS.items() if code in "fd"}
_KINDS = {int: (_INTS, "an integer"), float: (_INTS | _FLOATS, "a number"), str: ({STRING}, "a string")}


def _meta(g: GGUFFile, key: str, kind: type, default: Any = None) -> Any:
    """Metadata value `key`, checked to be of `kind` (int, float or str), or default when absent."""
    if key not in g.layout.meta:
        return default
    vtype, v = g.layout.meta[key]
    types, want = _KINDS[kind]
    if vtype not in types:
        got = (f"an array of {v.count} {TYPE_NAMES[v.item_type]}" if isinstance(v, GGUFArray)
               else f"{TYPE_NAMES[vtype]} {v!r}")
        raise LowbitError(f"{g.path}: GGUF metadata {key} must be {want}, got {got}")
    return v


# ModelConfig field -> the GGUF metadata key it is read from (errors name the key the file has)
GGUF_NAMES = {
    "vocab_size": "{arch}.vocab_size", "hidden_size": "{arch}.embedding_length",
    "intermediate_size": "{arch}.feed_forward_length", "num_layers": "{arch}.block_count",
    "num_heads": "{arch}.attention.head_count", "num_kv_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length", "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base", "rope_scaling": "{arch}.rope.scaling",
    "max_position_embeddings": "{arch}.context_length", "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}


def gguf_config(g: GGUFFile, path: str | Path) -> ModelConfig:
    """ModelConfig from GGUF metadata: typed, validated by ModelConfig, and matched against the tensors
    (block count) before anything is built from it."""
    arch = _meta(g, "general.architecture", str)
    record = arch_for_gguf(arch, str(path))

    def need(key: str, kind: type = int):
        v = _meta(g, f"{arch}.{key}", kind)
        if v is None:
            raise LowbitError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    n_heads, d = need("attention.head_count"), need("embedding_length")
    tensors = {t.name: t for t in g.layout.tensors}
    tokens = g.layout.meta.get("tokenizer.ggml.tokens", (None, None))[1]
    vocab = _meta(g, f"{arch}.vocab_size", int) or (tokens.count if isinstance(tokens, GGUFArray) else None)
    if not vocab and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].dims[-1]
    if not vocab:
        raise LowbitError(f"{path}: GGUF metadata lacks {arch}.vocab_size (and there is no tokenizer.ggml.tokens "
                          f"or token_embd.weight to count)")
    scaling = None
    kind = _meta(g, f"{arch}.rope.scaling.type", str)
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": _meta(g, f"{arch}.rope.scaling.factor", float, 1.0)}
        orig = _meta(g, f"{arch}.rope.scaling.original_context_length", int)
        if orig:
            scaling["original_max_position_embeddings"] = orig
    fields = dict(
        arch=record.name, vocab_size=vocab, hidden_size=d,
        intermediate_size=need("feed_forward_length"), num_layers=need("block_count"), num_heads=n_heads,
        num_kv_heads=_meta(g, f"{arch}.attention.head_count_kv", int) or n_heads,
        head_dim=_meta(g, f"{arch}.attention.key_length", int) or 0,
        rms_norm_eps=need("attention.layer_norm_rms_epsilon", float),
        rope_theta=_meta(g, f"{arch}.rope.freq_base", float, 10000.0), rope_scaling=scaling,
        max_position_embeddings=_meta(g, f"{arch}.context_length", int, 2048),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, attention_out_bias="blk.0.attn_output.bias" in tensors,
        bos_token_id=_meta(g, "tokenizer.ggml.bos_token_id", int),
        eos_token_id=_meta(g, "tokenizer.ggml.eos_token_id", int), name=Path(path).stem)
    try:
        cfg = ModelConfig(**fields)
    except LowbitError as e:
        names = {k: v.format(arch=arch) for k, v in GGUF_NAMES.items()}
        raise LowbitError(f"{path}: GGUF metadata {rename_fields(str(e).removeprefix('config: '), names)}") \
            from None
    blocks = {int(n.split(".")[1]) for n in tensors if re.fullmatch(r"blk\.[0-9]{1,9}\..+", n)}
    if blocks and blocks != set(range(cfg.num_layers)):   # (no blocks at all: build_model names the first)
        have = f"blocks 0..{max(blocks)}" if blocks == set(range(len(blocks))) else f"{len(blocks)} blocks"
        raise LowbitError(f"{path}: GGUF metadata says {arch}.block_count = {cfg.num_layers}, but the file "
                          f"holds tensors of {have}")
    return cfg


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> (first half, second half)."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)  # [H, 2, hd/2, in]


def gguf_state_dict(g: GGUFFile, cfg: ModelConfig, path: str | Path, progress=None) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32 under Hugging Face names."""
    record = arch_of(cfg)
    permuted = record.gguf_qk_permuted
    sd = {}
    for t in g.layout.tensors:
        name = record.gguf_to_hf(t.name)
        if name is None:
            if t.name.split(".")[0] in record.gguf_skip:
                continue
            raise LowbitError(f"{path}: unexpected tensor {t.name!r} for architecture {record.gguf_arch!r}")
        shape = tuple(reversed(t.dims))  # GGUF lists dims innermost first
        w = dequantize(g.tensor_data(t), t.type_name, shape, f"{path}: tensor {t.name}")
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
            if w.shape[0] != heads * cfg.head_dim:
                raise LowbitError(f"{path}: tensor {t.name} has {w.shape[0]} rows, the config implies {heads} "
                                  f"heads of {cfg.head_dim}")
            w = _unpermute(w, heads)
        sd[name] = w
        if progress is not None:
            progress()
    return sd


def gguf_tokenizer(g: GGUFFile, path: str | Path):
    """The tokenizer embedded in the GGUF file, converted by transformers (cached after the first time)."""
    import os
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    path = Path(path)
    tokens = g.layout.meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LowbitError(f"{path}: no tokenizer embedded (GGUF metadata lacks tokenizer.ggml.tokens)")
    if not isinstance(tokens[1], GGUFArray) or tokens[1].item_type != STRING or not tokens[1].count:
        raise LowbitError(f"{path}: GGUF metadata tokenizer.ggml.tokens must be a non-empty array of strings")
    _meta(g, "tokenizer.ggml.model", str)
    # Converting a GGUF vocabulary takes seconds; the result is keyed by the file's identity and by the
    # versions of the libraries that converted it (a new transformers may convert differently).
    import tokenizers
    import transformers

    st = path.stat()
    cache_root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "tokenizers"
    cached = cache_root / (f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{st.st_ino}"
                           f"-tf{transformers.__version__}-tok{tokenizers.__version__}")
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged cache entry: convert again
            shutil.rmtree(cached, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise LowbitError(f"{path}: cannot build the embedded tokenizer ({type(e).__name__}: {first_line(e)})") \
            from None
    try:  # best effort: a read-only home just means no cache
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp-"))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return tok
