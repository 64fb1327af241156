"""Read a GGUF file (llama.cpp's format): config from its metadata, dequantized weights, embedded tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError, first_line
from lowbit.models.arch import arch_for_gguf, arch_of
from lowbit.models.gguf_dequant import dequantize

def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path`, or a one-line LowbitError saying why the file is not usable."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LowbitError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on truncated/corrupt files
        raise LowbitError(f"{path}: truncated or corrupt GGUF file ({first_line(e)})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, path: str | Path) -> ModelConfig:
    """ModelConfig from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    record = arch_for_gguf(arch, str(path))

    def need(key: str):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise LowbitError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = need("attention.head_count")
    d = need("embedding_length")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[1])
    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": _field(reader, f"{arch}.rope.scaling.factor", 1.0)}
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = orig
    return ModelConfig(
        arch=record.name,
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=n_heads,
        num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv") or n_heads,
        head_dim=_field(reader, f"{arch}.attention.key_length") or d // n_heads,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=_field(reader, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        attention_out_bias="blk.0.attn_output.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        name=Path(path).stem,
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> (first half, second half)."""
    out, inp = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)  # [H, 2, hd/2, in]


def gguf_state_dict(reader, cfg: ModelConfig, path: str | Path, progress=None) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32 under Hugging Face names."""
    record = arch_of(cfg)
    permuted = record.gguf_qk_permuted
    sd = {}
    for t in reader.tensors:
        name = record.gguf_to_hf(t.name)
        if name is None:
            if t.name.split(".")[0] in record.gguf_skip:
                continue
            raise LowbitError(f"{path}: unexpected tensor {t.name!r} for architecture {record.gguf_arch!r}")
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        w = dequantize(t.data, t.tensor_type.name, shape, f"{path}: tensor {t.name}")
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.num_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.num_kv_heads)
        sd[name] = w
        if progress is not None:
            progress()
    return sd


def gguf_tokenizer(reader, path: str | Path):
    """The tokenizer embedded in the GGUF file, converted by transformers (cached after the first time)."""
    import os
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    path = Path(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise LowbitError(f"{path}: no tokenizer embedded (GGUF metadata lacks tokenizer.ggml.tokens)")
    # Converting a GGUF vocabulary takes seconds; the result is keyed by the file's identity and by the
    # versions of the libraries that converted it (a new transformers may convert differently).
    import tokenizers
    import transformers

    st = path.stat()
    cache_root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "tokenizers"
    cached = cache_root / (f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"
                           f"-tf{transformers.__version__}-tok{tokenizers.__version__}")
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise LowbitError(f"{path}: cannot build the embedded tokenizer ({first_line(e)})") from None
    try:  # best effort: a read-only home just means no cache
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp-"))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return tok
