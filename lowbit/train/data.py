"""Training data: random windows of a text, or sequences a model writes itself (LLM-QAT's data-free
distillation; black-box distillation's teacher text)."""
from __future__ import annotations

from typing import Iterator

import torch

from lowbit.config import SamplingParams
from lowbit.sampling import sample
from lowbit.text import random_windows


def text_batches(ids: torch.Tensor, batch: int, seqlen: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches [batch, seqlen] of a token stream ids [N], each at fresh seeded random offsets."""
    step = 0
    while True:
        yield random_windows(ids, batch, seqlen, seed=seed * 1_000_003 + step)      # [batch, seqlen]
        step += 1


def epoch_batches(seqs: torch.Tensor, batch: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches [batch, S] of fixed sequences seqs [N, S], reshuffled every epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(seqs.shape[0], generator=g)                            # [N]
        for i in range(0, seqs.shape[0] - batch + 1, batch):
            yield seqs[order[i: i + batch]]                                           # [batch, S]


@torch.inference_mode()
def continue_sequences(model, prefix: torch.Tensor, length: int, top_k: int = 50, greedy_first: int = 0,
                       batch: int = 256, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Extend each row of prefix [N, P] to `length` tokens with the model's own samples: the first
    `greedy_first` new tokens by argmax, the rest drawn from the top-k at temperature 1 -> [N, length]."""
    from tqdm.auto import tqdm

    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    greedy, topk = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=top_k)
    out = []
    bar = tqdm(total=prefix.shape[0] * (length - prefix.shape[1]), desc="generate", unit="tok",
               disable=not progress)
    for i in range(0, prefix.shape[0], batch):
        ids = prefix[i: i + batch].to(dev)                                            # [B, P]
        cache = model.new_cache(ids.shape[0], length)
        logits = model(ids, cache=cache, last_only=True)[:, -1]                       # [B, V]
        while ids.shape[1] < length:
            p = greedy if ids.shape[1] - prefix.shape[1] < greedy_first else topk
            nxt = sample(logits.float(), p, gen)                                      # [B]
            ids = torch.cat([ids, nxt[:, None]], 1)                                   # [B, t+1]
            bar.update(ids.shape[0])
            if ids.shape[1] < length:
                logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1]      # [B, V]
        out.append(ids.cpu())
    bar.close()
    return torch.cat(out)                                                             # [N, length]


def self_generated(model, n: int, length: int, top_k: int = 50, greedy_first: int = 3, batch: int = 256,
                   seed: int = 0, progress: bool = True) -> torch.Tensor:
    """LLM-QAT's data: n sequences [n, length] the model writes from a first token drawn uniformly from its
    vocabulary; the paper's hybrid takes the next few tokens by argmax, then samples."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, model.config.vocab_size, (n, 1), generator=g)            # [n, 1]
    return continue_sequences(model, first, length, top_k, greedy_first, batch, seed, progress)
