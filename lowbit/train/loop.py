"""The one training loop QAT and distillation share: AdamW, warm-up then cosine decay, gradient clipping,
bf16 autocast on a GPU, a progress bar with the running loss."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import kernels_disabled


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def to_dict(self) -> dict:
        k = max(1, len(self.losses) // 10)
        return {"steps": len(self.losses), "seconds": round(self.seconds, 1), "tokens": self.tokens,
                "loss_first": _mean(self.losses[:k]), "loss_last": _mean(self.losses[-k:])}


def _mean(xs):
    return round(sum(xs) / len(xs), 5) if xs else None


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(params: list[torch.nn.Parameter], loss_fn: Callable[[torch.Tensor], torch.Tensor],
          batches: Iterator[torch.Tensor], steps: int, lr: float, warmup: float = 0.05, grad_clip: float = 1.0,
          weight_decay: float = 0.0, desc: str = "train", progress: bool = True) -> TrainLog:
    """`steps` AdamW steps on `params`, each minimising loss_fn(next(batches)) (batches of token ids [B, T])."""
    from tqdm.auto import tqdm

    if steps <= 0 or lr <= 0:
        raise LowbitError(f"--steps and --lr must be > 0, got {steps} and {lr}")
    if not params:
        raise LowbitError("nothing to train: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    n_warm = int(warmup * steps)
    log, t0 = TrainLog(), time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, n_warm)
        ids = next(batches)
        with kernels_disabled():   # the Triton inference kernels (fused RMSNorm, SiLU·mul) have no backward
            loss = loss_fn(ids)
        if not torch.isfinite(loss):
            raise LowbitError(f"{desc}: the loss became {loss.item()} at step {step}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        log.losses.append(loss.item())
        log.tokens += ids.numel()
        bar.set_postfix(loss=f"{log.losses[-1]:.4f}")
    log.seconds = time.perf_counter() - t0
    return log
