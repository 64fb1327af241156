"""The tokenizer as the GGUF metadata llama.cpp reads (`tokenizer.ggml.*`, `tokenizer.chat_template`).

Two sources: a GGUF file's own `tokenizer.*` entries, copied value for value with their types (the file that
was loaded is the most faithful description of its vocabulary), or a Hugging Face tokenizer, written as
llama.cpp's converter lays out a byte-level BPE ("gpt2") vocabulary: every token text by id, its type
(normal, or control for a special added token, user-defined for any other added token), the merges as
"left right" strings, the special ids and the name of the pre-tokenizer llama.cpp must apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, first_line

# llama.cpp's token types (llama_token_type): what each id is for the tokenizer and the detokenizer
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class MetaValue:
    """One metadata entry: the writer's add_key_value(key, value, vtype, sub_type) arguments."""
    key: str
    value: Any
    vtype: Any                  # gguf.GGUFValueType
    sub_type: Any = None        # the item type of an array


def tokenizer_meta_from_gguf(path: str | Path) -> list[MetaValue]:
    """Every `tokenizer.*` entry of a GGUF file, with the value types it was stored with. The file is read
    with gguf.GGUFReader; the caller has already checked its structure (lowbit's loader opened it)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LowbitError(f"{path}: cannot read the GGUF metadata ({first_line(e)})") from None
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if len(f.types) != 2:       # arrays of arrays: no tokenizer key llama.cpp reads is one
                raise LowbitError(f"{path}: GGUF metadata {key} is a nested array; cannot carry it over")
            out.append(MetaValue(key, list(f.contents()), f.types[0], f.types[1]))
        else:
            out.append(MetaValue(key, f.contents(), f.types[0]))
    if not any(m.key == "tokenizer.ggml.tokens" for m in out):
        raise LowbitError(f"{path}: no tokenizer embedded (GGUF metadata lacks tokenizer.ggml.tokens)")
    return out


def _pre_name(pre: dict | None, where: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (it applies its own regexes by name)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = []
    for p in steps or []:
        if p is None:
            continue
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            kinds.append("bytelevel-gpt2")          # the GPT-2 regex inside ByteLevel
        elif p.get("type") == "Digits" and p.get("individual_digits"):
            kinds.append("digits")
        else:
            kinds.append(p.get("type", "?"))
    if kinds == ["bytelevel-gpt2"]:
        return "gpt2"
    if kinds == ["digits", "bytelevel-gpt2"]:   # each digit split off first, then GPT-2's regex
        return "smollm"
    raise LowbitError(f"{where}: cannot name llama.cpp's pre-tokenizer for this tokenizer's pre-tokenizer "
                      f"({' + '.join(kinds) or 'none'}); export from the model's GGUF file instead")


def tokenizer_meta_from_hf(tok, vocab_size: int, bos: int | None = None, eos: int | None = None,
                           where: str = "tokenizer") -> list[MetaValue]:
    """A Hugging Face byte-level BPE tokenizer as `tokenizer.ggml.*` metadata, `vocab_size` entries long (rows
    of the embedding no token uses are written as unused `[PAD{id}]` tokens, as llama.cpp's converter does).
    bos/eos: the model config's ids, used where the tokenizer names none."""
    from gguf import GGUFValueType as T

    if tok is None:
        raise LowbitError(f"{where}: no tokenizer to embed (llama.cpp needs one); load the model with its tokenizer")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(f"{where}: a {type(tok).__name__} has no tokenizers backend; only fast BPE tokenizers "
                          f"are written to GGUF")
    j = json.loads(backend.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE" or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise LowbitError(f"{where}: only byte-level BPE (gpt2-style) tokenizers are written to GGUF, this one is "
                          f"{model.get('type')} with a {(j.get('decoder') or {}).get('type')} decoder")
    pre = _pre_name(j.get("pre_tokenizer"), where)
    tokens: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for a in j.get("added_tokens", []):
        tokens[a["id"]] = (a["content"], CONTROL if a.get("special") else USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise LowbitError(f"{where}: token id {max(tokens)} is beyond the model's vocab_size {vocab_size}")
    texts = [tokens.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(vocab_size)]
    types = [tokens.get(i, ("", UNUSED))[1] for i in range(vocab_size)]
    # tokenizers >= 0.20 stores a merge as a [left, right] pair, older versions as "left right"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [MetaValue("tokenizer.ggml.model", "gpt2", T.STRING),
           MetaValue("tokenizer.ggml.pre", pre, T.STRING),
           MetaValue("tokenizer.ggml.tokens", texts, T.ARRAY, T.STRING),
           MetaValue("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
           MetaValue("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    ids = {"bos": tok.bos_token_id if tok.bos_token_id is not None else bos,
           "eos": tok.eos_token_id if tok.eos_token_id is not None else eos,
           "unknown": tok.unk_token_id, "padding": tok.pad_token_id}
    out += [MetaValue(f"tokenizer.ggml.{k}_token_id", int(v), T.UINT32) for k, v in ids.items() if v is not None]
    # Whether encoding adds BOS: what the tokenizer does, measured rather than read from a flag.
    probe = tok("a").input_ids
    adds_bos = ids["bos"] is not None and len(probe) > 0 and probe[0] == ids["bos"]
    out += [MetaValue("tokenizer.ggml.add_bos_token", bool(adds_bos), T.BOOL),
            MetaValue("tokenizer.ggml.add_space_prefix", False, T.BOOL)]   # byte-level BPE adds no prefix space
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(MetaValue("tokenizer.chat_template", template, T.STRING))
    return out
