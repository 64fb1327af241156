"""When a generated sequence ends: EOS, a stop string or max_tokens. One rule for every generation loop
(`lowbit.generate`, the engine, speculative decoding), so they finish on the same token."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lowbit.config import SamplingParams


@dataclass
class GenerationOutput:
    """One finished sequence: its prompt, generated ids, text and why it ended."""
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None     # "eos" | "stop" | "length"


def eos_ids(cfg, tok, params: SamplingParams) -> frozenset[int]:
    """Token ids that end a sequence: the model config's and the tokenizer's EOS (none with ignore_eos)."""
    if params.ignore_eos:
        return frozenset()
    ids = set(cfg.eos_ids)
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(tok.eos_token_id)
    return frozenset(ids)


def text_decoder(tok) -> Callable[[list[int]], str] | None:
    """ids -> text as stop strings and outputs see it; None without a tokenizer (stop strings never match)."""
    return (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else None


def stop_at(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def append_token(ids: list[int], token: int, params: SamplingParams, eos: frozenset[int],
                 decode: Callable[[list[int]], str] | None = None) -> str | None:
    """Add a sampled token to a sequence's output `ids` and say whether it finished there.

    An EOS token is not added ("eos"); otherwise the token is added, then "stop" if the decoded text
    (when `decode` is given) now contains a stop string, "length" at max_tokens, else None."""
    if token in eos:
        return "eos"
    ids.append(token)
    if params.stop and decode is not None and stop_at(decode(ids), params.stop) >= 0:
        return "stop"
    if len(ids) >= params.max_tokens:
        return "length"
    return None


def final_text(text: str, reason: str | None, params: SamplingParams) -> str:
    """The text a finished sequence returns: cut before the stop string that ended it."""
    return text[:stop_at(text, params.stop)] if reason == "stop" else text
