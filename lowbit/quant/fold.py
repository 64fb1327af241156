"""Fold a per-input-channel scale into a (producer -> consumers) pair without changing the float function.

AWQ and SmoothQuant both rewrite  Y = X Wᵀ  as  Y = (X diag(s)⁻¹) (W diag(s))ᵀ : the consumers' weight columns
are multiplied by s and the producer of X is changed so that it emits X / s. The division has to be absorbed
by whatever produces X:

  norm producer    (RMSNorm / LayerNorm: y = weight ⊙ x̂ [+ bias])   weight /= s  (and bias /= s)
  Linear producer  (v_proj -> o_proj, up_proj -> down_proj)          rows: weight[j, :] /= s_j, bias[j] /= s_j

The Linear case is exact for up_proj -> down_proj because down_proj's input is silu(gate) ⊙ up, which is linear
in up's output channel by channel; and for v_proj -> o_proj because attention mixes value vectors over tokens
only, never over channels. It needs o_proj's input channel j to be v_proj's output channel j, so
v.out_features == o.in_features. With GQA (SmolLM2: 3 KV heads x 64 = 192 outputs of v_proj, 9 heads x 64 = 576
inputs of o_proj) each value channel is read by n_heads / n_kv query heads, and the pair is skipped, as the AWQ
reference does (llm-awq auto_scale.py: the (v_proj, o_proj) scale is only searched when
`v_proj.weight.shape == o_proj.weight.shape`; AutoAWQ the same).

All functions work in place on the modules' parameters, compute in float32 (float64 stays float64) and write
back in the parameters' own dtype. They keep no state.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lowbit.errors import LowbitError


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check_scale(s: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if s.ndim != 1 or s.numel() != n:
        raise LowbitError(f"{what}: scale has shape {tuple(s.shape)} but the channel count is {n}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise LowbitError(f"{what}: scale must be finite and > 0")
    return s


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def _is_norm(m: nn.Module) -> bool:
    """A norm-like producer: an elementwise affine weight [d] (and optional bias [d]) on its output."""
    w = getattr(m, "weight", None)
    return not _is_linear(m) and isinstance(w, torch.Tensor) and w.ndim == 1


def can_fold(producer: nn.Module, consumers: Sequence[nn.Module]) -> bool:
    """Whether a scale over the consumers' input channels can be absorbed by `producer` exactly.

    False for a Linear producer whose outputs are not the consumers' inputs one to one (GQA v_proj -> o_proj).
    """
    if not consumers or not all(_is_linear(c) for c in consumers):
        return False
    n = consumers[0].in_features
    if any(c.in_features != n for c in consumers):
        return False
    if _is_linear(producer):
        return producer.out_features == n
    if _is_norm(producer):
        return producer.weight.numel() == n
    return False


@torch.no_grad()
def scale_consumers(consumers: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """W[:, j] *= s_j for every consumer: weight [out, in] times s [in] broadcast over rows."""
    for c in consumers:
        _check_scale(s, c.in_features, "scale_consumers")
        w = c.weight
        w.copy_((_work(w) * _work(s).to(w.device)[None, :]).to(w.dtype))          # [out, in] * [1, in]


@torch.no_grad()
def fold_into_norm(norm: nn.Module, consumers: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight [d] /= s (and norm.bias), consumers' columns *= s: the norm then emits X / s."""
    if not _is_norm(norm):
        raise LowbitError(f"fold_into_norm: {type(norm).__name__} has no 1-d weight to absorb a scale")
    if not can_fold(norm, consumers):
        raise LowbitError(f"fold_into_norm: norm of width {norm.weight.numel()} does not feed consumers with "
                          f"in_features {[c.in_features for c in consumers]}")
    _check_scale(s, norm.weight.numel(), "fold_into_norm")
    for p in (norm.weight, getattr(norm, "bias", None)):
        if isinstance(p, torch.Tensor):
            p.copy_((_work(p) / _work(s).to(p.device)).to(p.dtype))                 # [d] / [d]
    scale_consumers(consumers, s)


@torch.no_grad()
def fold_into_linear(producer: nn.Linear, consumers: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """producer rows weight[j, :] /= s_j and bias[j] /= s_j, consumers' columns *= s.

    producer.weight [c, in_p] with c == consumers' in_features; s [c].
    """
    if not _is_linear(producer):
        raise LowbitError(f"fold_into_linear: producer is a {type(producer).__name__}, not an nn.Linear")
    if not can_fold(producer, consumers):
        raise LowbitError(f"fold_into_linear: producer has {producer.out_features} outputs but the consumers "
                          f"read {[c.in_features for c in consumers]} inputs (GQA v_proj -> o_proj cannot fold)")
    _check_scale(s, producer.out_features, "fold_into_linear")
    w = producer.weight
    w.copy_((_work(w) / _work(s).to(w.device)[:, None]).to(w.dtype))                 # [c, in_p] / [c, 1]
    if producer.bias is not None:
        b = producer.bias
        b.copy_((_work(b) / _work(s).to(b.device)).to(b.dtype))                     # [c] / [c]
    scale_consumers(consumers, s)


def fold_scale(block: nn.Module, producer: str, consumers: Sequence[str], s: torch.Tensor) -> None:
    """Fold s [in] into the named pair of `block` (names relative to it, as BlockLayout.input_groups)."""
    prod = block.get_submodule(producer)
    cons = [block.get_submodule(c) for c in consumers]
    if _is_linear(prod):
        fold_into_linear(prod, cons, s)
    else:
        fold_into_norm(prod, cons, s)


Group = tuple[str, tuple[str, ...]]          # (producer, consumers), names relative to the block


def foldable_groups(block: nn.Module, layout) -> tuple[list[Group], list[Group]]:
    """(groups a scale can be folded into, groups skipped) of layout.input_groups for this block."""
    ok, skipped = [], []
    for producer, consumers in layout.input_groups:
        prod = block.get_submodule(producer)
        cons = [block.get_submodule(c) for c in consumers]
        (ok if can_fold(prod, cons) else skipped).append((producer, tuple(consumers)))
    return ok, skipped


def producer_is_norm(block: nn.Module, producer: str) -> bool:
    return _is_norm(block.get_submodule(producer))
