"""Distillation losses as pure functions: KL between output distributions, MSE between hidden states."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reverse: bool = False) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) (forward; LLM-QAT's and Hinton's loss) or
    KL(student || teacher) (reverse: mode-seeking, MiniLLM's choice), at a temperature, times T^2 so the
    gradient's scale does not depend on T. logits [..., V]."""
    t = temperature
    ls = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)    # [N, V]
    lt = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)    # [N, V]
    p, logp, logq = (ls.exp(), ls, lt) if reverse else (lt.exp(), lt, ls)
    return (p * (logp - logq)).sum(-1).mean() * t * t


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] predict ids [B, T] shifted by one."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over aligned pairs of ||h_s - h_t||^2 / ||h_t||^2 per token: relative, so blocks whose hidden
    states grow large (the residual stream does) do not dominate."""
    losses = [((s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp(min=1e-6)).mean()
              for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()
