"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for one sequence on contiguous KV caches.

A cheap draft model proposes k tokens one at a time; the target scores all of them (plus one bonus
position) in ONE forward over its cache. Proposed token x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from the residual
norm(max(0, p_i - q_i)); when all k are accepted the bonus token is drawn from p_{k+1}. Every emitted token
is then distributed exactly as the target alone would sample it (p and q are the softmax of
`filter_logits`, so temperature / top-k / top-p apply to both). In greedy mode a draft token is accepted
while it equals the target's argmax, and the first disagreement takes the target's argmax: the output is
the target's greedy output token for token (up to floating-point summation order of the batched forward).

Cache bookkeeping: both caches always hold the committed sequence minus its last token `cur` (and the
draft may lag further behind: `draft_todo` lists committed tokens it has not seen yet; they are fed in
front of its first proposal step). Rejected columns are rolled back by setting `cache.pos` back; columns
beyond `pos` are overwritten later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError
from lowbit.stopping import GenerationOutput
from lowbit.sampling import filter_logits
from lowbit.stopping import append_token, eos_ids, final_text, text_decoder


@dataclass
class SpecStats:
    proposed: int = 0            # draft tokens proposed to the target
    accepted: int = 0            # of those, accepted
    rounds: int = 0              # draft-propose / target-verify rounds
    target_forwards: int = 0     # target forwards after the prefill (one per round)
    draft_forwards: int = 0      # draft forwards after the prefill
    new_tokens: int = 0          # tokens emitted (EOS not counted)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def wall_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput (emitted tokens / decode seconds), comparable to GenerationStats'."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> str:
        return (f"accepted {self.accepted}/{self.proposed} ({self.acceptance_rate:.1%}) | "
                f"{self.new_tokens} tok in {self.target_forwards} target + {self.draft_forwards} draft "
                f"forwards ({self.tokens_per_target_forward:.2f} tok/target fwd) | "
                f"decode {self.decode_seconds:.2f} s = {self.tokens_per_s:.1f} tok/s")


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; falls back to p where p <= q everywhere (then no rejection
    can happen, so the fallback is never sampled from in exact arithmetic)."""
    r = (p - q).clamp(min=0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp(min=torch.finfo(r.dtype).tiny), p)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """The speculative-sampling rule on probabilities p [k+1, V] (target) and q [k, V] (draft) for the
    draft tokens `drafts` (k of them, each sampled from its q row).

    Returns (n_accepted, next_token): drafts[:n_accepted] are kept, then next_token (drawn from the
    residual at the first rejection, or from p[k] when all k are accepted)."""
    k = len(drafts)
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), float(q[i, x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * qx < px:                                  # u < p/q without dividing (q(x) > 0: x ~ q)
            continue
        r = residual_distribution(p[i], q[i])
        return i, int(torch.multinomial(r, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def accept_greedy(p_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """Greedy rule: accept while the draft token equals the target's argmax; then the target's argmax."""
    top = p_logits.argmax(-1).tolist()                  # [k+1]
    n = 0
    while n < len(drafts) and drafts[n] == top[n]:
        n += 1
    return n, top[n]


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [T, V] -> the sampling distribution [T, V] (temperature / top-k / top-p applied)."""
    return filter_logits(logits, params).softmax(-1)


@torch.inference_mode()
def speculative_generate(target, draft, tok, prompt_ids: list[int], params: SamplingParams,
                         k: int = 4) -> tuple[GenerationOutput, SpecStats]:
    """Generate for one prompt with `draft` proposing `k` tokens per round and `target` verifying them."""
    if not prompt_ids:
        raise LowbitError("prompt_ids: the prompt needs at least one token")
    if k < 1:
        raise LowbitError(f"k: must be >= 1, got {k}")
    cfg = target.config
    if draft.config.vocab_size != cfg.vocab_size:
        raise LowbitError(f"draft vocab ({draft.config.vocab_size}) != target vocab ({cfg.vocab_size}): "
                          "the draft must share the target's tokenizer")
    L = len(prompt_ids)
    if L + params.max_tokens > min(cfg.max_position_embeddings, draft.config.max_position_embeddings):
        raise LowbitError(f"prompt ({L} tokens) + max_tokens ({params.max_tokens}) exceeds the context")
    t_dev, d_dev = target.device, draft.device
    max_len = L + params.max_tokens + k + 1
    t_cache, d_cache = target.new_cache(1, max_len), draft.new_cache(1, max_len)
    gen = torch.Generator(device=t_dev).manual_seed(params.seed) if params.seed is not None else None
    eos = eos_ids(cfg, tok, params)
    decode = text_decoder(tok)
    out = GenerationOutput(prompt_ids=list(prompt_ids))
    st = SpecStats(prompt_tokens=L)

    # Prefill all but the last prompt token: it is fed in front of the first round's proposals.
    t0 = time.perf_counter()
    if L > 1:
        head = prompt_ids[:-1]
        target(torch.tensor([head], device=t_dev), cache=t_cache, last_only=True)
        draft(torch.tensor([head], device=d_dev), cache=d_cache, last_only=True)
    st.prefill_seconds = time.perf_counter() - t0
    cur = prompt_ids[-1]          # last committed token, in neither cache
    draft_todo: list[int] = []    # committed tokens before `cur` the draft cache still lacks

    t1 = time.perf_counter()
    while out.finish_reason is None:
        remaining = params.max_tokens - len(out.token_ids)
        kk = min(k, remaining - 1)           # a round emits at most kk + 1 tokens
        base = t_cache.pos                   # committed length - 1
        # Draft: propose kk tokens autoregressively.
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        feed = draft_todo + [cur]
        for _ in range(kk):
            logits = draft(torch.tensor([feed], device=d_dev), cache=d_cache, last_only=True)[0, -1]
            st.draft_forwards += 1
            if params.greedy:
                x = int(logits.argmax())
            else:
                q = _probs(logits[None].to(t_dev), params)[0]
                x = int(torch.multinomial(q, 1, generator=gen))
                q_rows.append(q)
            drafts.append(x)
            feed = [x]
        if kk > 0:
            draft_todo = []
        # Target: score cur + all drafts in one forward -> kk + 1 next-token distributions.
        p_logits = target(torch.tensor([[cur] + drafts], device=t_dev), cache=t_cache)[0]   # [kk+1, V]
        st.target_forwards += 1
        st.rounds += 1
        st.proposed += kk
        if params.greedy:
            n_acc, nxt = accept_greedy(p_logits, drafts)
        else:
            n_acc, nxt = accept_or_resample(_probs(p_logits, params), torch.stack(q_rows) if q_rows else
                                            p_logits.new_zeros(0, p_logits.shape[-1]), drafts, gen)
        st.accepted += n_acc
        # Roll back: the target keeps cur + accepted drafts; the draft saw cur + drafts[:kk-1] (if kk > 0).
        t_cache.pos = base + 1 + n_acc
        if kk > 0:
            d_cache.pos = min(d_cache.pos, base + 1 + n_acc)
            draft_todo = ([cur] + drafts)[d_cache.pos - base:1 + n_acc]
        else:
            draft_todo = draft_todo + [cur]
        # Commit drafts[:n_acc] + nxt, honouring EOS / stop strings / max_tokens token by token.
        for t in drafts[:n_acc] + [nxt]:
            out.finish_reason = append_token(out.token_ids, t, params, eos, decode)
            if out.finish_reason is not None:
                break
        cur = nxt
    st.decode_seconds = time.perf_counter() - t1
    st.new_tokens = len(out.token_ids)
    if decode is not None:
        out.text = final_text(decode(out.token_ids), out.finish_reason, params)
    return out, st
