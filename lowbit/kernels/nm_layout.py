"""The compressed N:M layout of a sparse weight: per row, the kept values and each one's position within
its group of M (what cuSPARSELt's 2:4 format holds as values + 2-bit metadata; here one uint8 per value)."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive columns of every row has at most n non-zeros."""
    out, k = W.shape
    return k % m == 0 and bool(((W.reshape(out, k // m, m) != 0).sum(-1) <= n).all())


def compress_nm(W: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, k] with at most n non-zeros in every m columns -> (values [out, k n/m] in W's dtype, index
    uint8 [out, k n/m]: each value's position within its group of m, ascending). A group with fewer than n
    non-zeros stores zeros at its first unused positions."""
    out, k = W.shape
    if k % m:
        raise LowbitError(f"compress_nm: {k} columns are not a multiple of M={m}")
    if not is_nm(W, n, m):
        raise LowbitError(f"compress_nm: the weight has more than {n} non-zeros in some group of {m}")
    g = W.reshape(out, k // m, m)                                         # [out, k/m, m]
    # non-zeros first (a stable sort keeps their positions ascending), then zeros to fill n slots
    order = torch.argsort((g == 0).to(torch.int8), dim=-1, stable=True)[..., :n]   # [out, k/m, n]
    order = order.sort(-1).values
    values = g.gather(-1, order)                                          # [out, k/m, n]
    return values.reshape(out, -1).contiguous(), order.to(torch.uint8).reshape(out, -1).contiguous()


def decompress_nm(values: torch.Tensor, index: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The inverse of compress_nm: values and positions [out, k n/m] -> W [out, k]."""
    out, kv = values.shape
    groups = kv // n
    W = values.new_zeros(out, groups, m)
    W.scatter_(-1, index.long().reshape(out, groups, n), values.reshape(out, groups, n))
    return W.reshape(out, groups * m)
