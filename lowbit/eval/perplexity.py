"""Perplexity (the GPTQ paper's protocol) and, against a base model, KL divergence and top-1 agreement."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError


@dataclass
class EvalResult:
    perplexity: float
    nll: float                      # mean next-token negative log-likelihood (nats)
    tokens: int                     # predicted tokens
    windows: int
    seqlen: int
    seconds: float
    kl: float | None = None         # mean KL(base || model) per predicted token (nats)
    top1_agreement: float | None = None
    base_perplexity: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Reference:
    """The base model's next-token distribution over one window, computed once and shared by every
    model scored against it (log_softmax + exp of [T, V] costs as much as a fifth of a forward)."""
    logp: torch.Tensor              # [T, V] log-probabilities
    p: torch.Tensor                 # [T, V] probabilities
    top1: torch.Tensor              # [T] argmax
    nll: float                      # summed NLL of the targets

    @classmethod
    def of(cls, base_logits: torch.Tensor, targets: torch.Tensor) -> "Reference":
        logp = F.log_softmax(base_logits.float(), dim=-1)                           # [T, V]
        return cls(logp, logp.exp(), logp.argmax(-1), -logp.gather(-1, targets[:, None]).sum().item())


def window_stats(logits: torch.Tensor, targets: torch.Tensor,
                 base: torch.Tensor | Reference | None = None) -> dict:
    """Sums over one window. logits [T, V] predict targets [T]; base (logits [T, V] or a Reference of
    them) adds KL(base || model), top-1 agreement and the base's NLL."""
    logp = F.log_softmax(logits.float(), dim=-1)                                  # [T, V]
    out = {"nll": -logp.gather(-1, targets[:, None]).sum().item()}
    if base is not None:
        ref = base if isinstance(base, Reference) else Reference.of(base, targets)
        out["base_nll"] = ref.nll
        out["kl"] = (ref.p * (ref.logp - logp)).sum().item()
        out["top1"] = (logp.argmax(-1) == ref.top1).sum().item()
    return out


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, base=None, progress: bool = True) -> EvalResult:
    """Perplexity of `model` over windows [W, S]: exp of the mean NLL of every predicted token.

    No BOS is prepended (the windows are raw slices of the token stream), so the first token of each
    window is context only and S - 1 tokens per window are predicted. With `base`, also the mean KL
    divergence of the model's next-token distribution from the base's and the top-1 agreement.
    """
    from tqdm.auto import tqdm

    if windows.ndim != 2:
        raise LowbitError(f"windows: expected [W, S] token ids, got shape {tuple(windows.shape)}")
    W, S = windows.shape
    if windows.max().item() >= model.config.vocab_size:
        raise LowbitError(f"text has token id {windows.max().item()} beyond the model's vocab "
                          f"{model.config.vocab_size}: was it tokenized with another tokenizer?")
    sums = {"nll": 0.0, "base_nll": 0.0, "kl": 0.0, "top1": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(range(W), desc="eval", unit="win", disable=not progress, leave=False)
    for i in bar:
        ids = windows[i: i + 1].to(model.device)                                  # [1, S]
        logits = model(ids)[0, :-1]                                               # [S-1, V]
        base_logits = base(ids.to(base.device))[0, :-1].to(logits.device) if base is not None else None
        for k, v in window_stats(logits, ids[0, 1:], base_logits).items():
            sums[k] += v
        bar.set_postfix(ppl=f"{math.exp(sums['nll'] / ((i + 1) * (S - 1))):.3f}")
    n = W * (S - 1)
    res = EvalResult(perplexity=math.exp(sums["nll"] / n), nll=sums["nll"] / n, tokens=n, windows=W,
                     seqlen=S, seconds=time.perf_counter() - t0)
    if base is not None:
        res.kl, res.top1_agreement = sums["kl"] / n, sums["top1"] / n
        res.base_perplexity = math.exp(sums["base_nll"] / n)
    return res
