"""Generation with a contiguous KV cache: prefill the prompts once, then decode token by token.

Batches of prompts of different lengths are left-padded: the cache masks the pad columns and each
sequence's RoPE positions start at 0 at its first real token, so a padded row computes exactly what the
prompt alone would (up to floating-point summation order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError
from lowbit.sampling import sample
from lowbit.stopping import GenerationOutput, append_token, eos_ids, final_text, text_decoder


@dataclass
class GenerationStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0
    batch: int = 1

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_seconds * 1e3:.1f} ms | "
                f"decode {self.decode_steps} steps x {self.batch} in {self.decode_seconds:.2f} s "
                f"= {self.decode_tokens_per_s:.1f} tok/s")


def encode_prompt(tok, prompt: str, chat: bool = False) -> list[int]:
    """Prompt text -> token ids, through the tokenizer's chat template when `chat`."""
    if chat:
        return encode_chat(tok, [{"role": "user", "content": prompt}])
    return tok(prompt).input_ids


def encode_chat(tok, messages: list[dict[str, str]]) -> list[int]:
    """Chat messages ({"role", "content"}) -> token ids of the model's chat template, ready for the
    assistant's reply."""
    if not getattr(tok, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def generate(model, tok, prompts: list[list[int]], params: SamplingParams,
             on_token: Callable[[int, int], None] | None = None) -> tuple[list[GenerationOutput], GenerationStats]:
    """Generate for a batch of token-id prompts; `on_token(row, token_id)` is called as tokens appear."""
    cfg = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LowbitError("prompts: every prompt needs at least one token")
    B, L = len(prompts), max(len(p) for p in prompts)
    if L + params.max_tokens > cfg.max_position_embeddings:
        raise LowbitError(f"prompt ({L} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                          f"context of {cfg.max_position_embeddings}")
    dev = model.device
    pad = torch.tensor([L - len(p) for p in prompts], device=dev)                      # [B]
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=dev)          # [B, L]
    cache = model.new_cache(B, L + params.max_tokens, pad)
    gen = torch.Generator(device=dev).manual_seed(params.seed) if params.seed is not None else None
    eos = eos_ids(cfg, tok, params)
    decode = text_decoder(tok)
    outs = [GenerationOutput(prompt_ids=list(p)) for p in prompts]
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), batch=B)

    t0 = time.perf_counter()
    logits = model(ids, cache=cache, last_only=True)[:, -1]                            # [B, V]
    stats.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(params.max_tokens):
        nxt = sample(logits, params, gen)                                              # [B]
        for b, o in enumerate(outs):
            if o.finish_reason is not None:
                continue
            t = int(nxt[b])
            o.finish_reason = append_token(o.token_ids, t, params, eos, decode)
            if on_token is not None and o.finish_reason != "eos":
                on_token(b, t)
        if all(o.finish_reason is not None for o in outs):
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
        stats.decode_steps = step + 1
    stats.decode_seconds = time.perf_counter() - t1 if stats.decode_steps else 0.0
    for o in outs:
        if decode is not None:
            o.text = final_text(decode(o.token_ids), o.finish_reason, params)
    return outs, stats
