"""Forward-pass FLOPs of a Llama-family decoder.

Only matrix multiplies are counted, at 2*m*n*k FLOPs each (one multiply + one add per MAC):
the block projections (q, k, v, o, gate, up, down), the two attention batched matmuls
(Q K^T and P V), and the lm_head. Norms, RoPE, softmax, SiLU, residual adds and bias adds are
O(b*s*d) elementwise work and ignored -- the same convention as torch's FlopCounterMode,
which the tests compare against exactly.

Attention is counted as "query-key pairs": QK^T and PV each cost 2*hd FLOPs per (head, query,
key) pair, so attention = L * 4 * b * h * hd * pairs. By default a prefill counts the full s*s
rectangle, as eager attention (masked matmul) computes it; causal=True counts only the
s*(s+1)/2 unmasked pairs, which is what a causal FlashAttention kernel roughly does.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.analysis.memory import block_linears, check_positive
from lowbit.config import ModelConfig


@dataclass(frozen=True)
class Flops:
    """FLOPs of one forward (or a sum of forwards), split by kind of matmul."""

    linear: int      # block projections q,k,v,o,gate,up,down over all layers
    attention: int   # QK^T + PV over all layers
    lm_head: int     # d -> V projection of the positions whose logits are computed

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lm_head

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.linear + other.linear, self.attention + other.attention,
                     self.lm_head + other.lm_head)

    def to_dict(self) -> dict[str, int]:
        return {"linear": self.linear, "attention": self.attention, "lm_head": self.lm_head,
                "total": self.total}


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """2 * (block Linear weights) over all layers: the per-token cost of the projections."""
    return 2 * cfg.num_layers * sum(x.weight_numel for x in block_linears(cfg))


def lm_head_flops_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg: ModelConfig, batch: int, pairs: int) -> int:
    """QK^T + PV over all layers for `pairs` (query, key) pairs per sequence and head.

    QK^T: [q, hd] x [hd, k] per head -> 2*q*k*hd; PV: [q, k] x [k, hd] -> 2*q*k*hd. With GQA the
    K/V heads are shared, but every query head still does its own matmuls, so h (not kv) appears.
    """
    return cfg.num_layers * 4 * batch * cfg.num_heads * cfg.head_dim * pairs


def _prefill_pairs(s: int, causal: bool) -> int:
    return s * (s + 1) // 2 if causal else s * s


def prefill_flops(cfg: ModelConfig, seqlen: int, batch: int = 1, *, causal: bool = False,
                  all_logits: bool = True) -> Flops:
    """One forward over b sequences of s tokens with an empty cache.

    all_logits=True projects every position through lm_head (a plain HF forward does);
    False projects only the last one (all a generator needs).
    """
    check_positive("seqlen", seqlen)
    check_positive("batch", batch)
    tokens = batch * seqlen
    return Flops(
        linear=tokens * linear_flops_per_token(cfg),
        attention=attention_flops(cfg, batch, _prefill_pairs(seqlen, causal)),
        lm_head=(tokens if all_logits else batch) * lm_head_flops_per_token(cfg),
    )


def decode_flops(cfg: ModelConfig, context_len: int, batch: int = 1) -> Flops:
    """One decode step: b sequences feed one new token each, which attends to `context_len`
    keys = the tokens already cached PLUS itself (e.g. the first step after a prompt of p
    tokens has context_len = p + 1)."""
    check_positive("context_len", context_len)
    check_positive("batch", batch)
    return Flops(
        linear=batch * linear_flops_per_token(cfg),
        attention=attention_flops(cfg, batch, context_len),
        lm_head=batch * lm_head_flops_per_token(cfg),
    )


def _sum_k(a: int, c: int) -> int:
    """sum_{k=a}^{c} k (0 when c < a)."""
    return 0 if c < a else (a + c) * (c - a + 1) // 2


def _sum_k2(a: int, c: int) -> int:
    """sum_{k=a}^{c} k^2 (0 when c < a)."""
    def s2(n: int) -> int:
        return n * (n + 1) * (2 * n + 1) // 6
    return 0 if c < a else s2(c) - s2(a - 1)


def generation_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int, batch: int = 1, *,
                     use_cache: bool = True, causal: bool = False) -> Flops:
    """Total FLOPs to generate `new_tokens` tokens after a `prompt_len`-token prompt.

    Step 0 is a prefill of the prompt, whose last-position logits give the first new token.
    With a KV cache, each of the remaining n-1 steps is a decode step at context p+1 .. p+n-1.
    Without one, step j re-runs the whole prefix of p+j tokens from scratch (j = 0 .. n-1).
    Only last-position logits are computed at every step, as a generator would.
    Closed forms keep this O(1) in n; the result equals summing prefill_/decode_flops.
    """
    p, n, b = (check_positive("prompt_len", prompt_len), check_positive("new_tokens", new_tokens),
               check_positive("batch", batch))
    lm = b * n * lm_head_flops_per_token(cfg)          # one logits row per sequence per step
    if use_cache:
        tokens = p + (n - 1)                            # every token goes through the layers once
        pairs = _prefill_pairs(p, causal) + _sum_k(p + 1, p + n - 1)
    else:
        tokens = _sum_k(p, p + n - 1)                   # prefix lengths p, p+1, ..., p+n-1
        pairs = (_sum_k2(p, p + n - 1) + _sum_k(p, p + n - 1)) // 2 if causal \
            else _sum_k2(p, p + n - 1)
    return Flops(linear=b * tokens * linear_flops_per_token(cfg),
                 attention=attention_flops(cfg, b, pairs), lm_head=lm)


def generation_flops_summary(cfg: ModelConfig, prompt_len: int, new_tokens: int,
                             batch: int = 1) -> dict[str, object]:
    """With- vs without-KV-cache totals and their ratio."""
    with_c = generation_flops(cfg, prompt_len, new_tokens, batch, use_cache=True)
    without = generation_flops(cfg, prompt_len, new_tokens, batch, use_cache=False)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch,
            "with_cache": with_c.to_dict(), "without_cache": without.to_dict(),
            "ratio_without_over_with": without.total / with_c.total}
