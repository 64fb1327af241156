"""Weight sparsity as pure tensor functions: N:M and unstructured masks, the magnitude and Wanda scores,
SparseGPT (Frantar & Alistarh, 2023) and the compressed N:M layout.

Conventions: W [out, n] (n = in_features); a mask is bool [out, n], True where a weight is KEPT. "N:M"
keeps N of every M consecutive weights along the input of each row (NVIDIA's "2:4": two non-zeros in
every four), so 2:4 and 4:8 are 50% sparse; an unstructured pattern prunes a fraction of the weights.

SparseGPT runs GPTQ's machinery (lowbit.quant.gptq_core: the walk's Hessian H = 2 X Xᵀ / N, its damped
inverse Cholesky factor U, lazy batch updates) with pruning in place of rounding: column q is set to 0
(or rounded, when jointly quantized), and its error (w_q - q) / U_qq is spread over the later columns by
row q of U, which is the OBS update of Eq. 3 of GPTQ. The mask is chosen as the paper does: for N:M,
at every M-th column from w² / U_qq² over the next M columns of each row; unstructured, at the start of
every block of columns, the smallest w² / U_qq² of the whole block.
"""
from __future__ import annotations

import dataclasses

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.nm_layout import compress_nm, decompress_nm, is_nm
from lowbit.kernels.primitives import QuantSpec, dequantize, quantize
from lowbit.quant.gptq_core import _damped_inverse_cholesky, _row_params


@dataclasses.dataclass(frozen=True)
class Pattern:
    """N:M (keep n of every m) when m > 0, else unstructured: prune `fraction` of the weights."""
    n: int = 0
    m: int = 0
    fraction: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def density(self) -> float:
        return self.n / self.m if self.structured else 1.0 - self.fraction

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"


def parse_pattern(text) -> Pattern:
    """'2:4' / '4:8' (keep N of every M) or a fraction in (0, 1) to prune, e.g. '0.5'."""
    s = str(text).strip()
    if ":" in s:
        a, _, b = s.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            n = m = -1
        if not (0 < n < m <= 64):
            raise LowbitError(f"--sparsity: expected N:M with 0 < N < M <= 64 (e.g. 2:4), got {s!r}")
        return Pattern(n=n, m=m)
    try:
        f = float(s)
    except ValueError:
        f = -1.0
    if not 0.0 < f < 1.0:
        raise LowbitError(f"--sparsity: expected N:M (e.g. 2:4) or a fraction to prune in (0, 1), got {s!r}")
    return Pattern(fraction=f)


def check_fits(pattern: Pattern, in_features: int) -> None:
    if pattern.structured and in_features % pattern.m:
        raise LowbitError(f"--sparsity {pattern}: in_features={in_features} is not a multiple of {pattern.m}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive columns of each row: bool [out, in]."""
    out, k = scores.shape
    s = scores.reshape(out, k // m, m)                                    # [out, k/m, m]
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(2, s.topk(n, dim=2).indices, True)
    return keep.reshape(out, k)


def unstructured_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, prune the `fraction` lowest-scoring columns (Wanda's comparison group): bool [out, in]."""
    out, k = scores.shape
    n_prune = int(k * fraction)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        keep.scatter_(1, scores.topk(n_prune, dim=1, largest=False).indices, False)
    return keep


def pattern_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return nm_mask(scores, pattern.n, pattern.m) if pattern.structured else unstructured_mask(scores, pattern.fraction)


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W|: prune the smallest weights."""
    return W.abs()


def wanda_scores(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |W_ij| · ||X_j||₂, the input feature's norm over the calibration tokens."""
    return W.abs() * x_norm.to(W)[None, :]                                # [out, in] * [1, in]


class ColumnNorm:
    """Running Σ_tokens x_j² per input feature (Wanda's ||X_j||² before the square root)."""

    def __init__(self):
        self.sq: torch.Tensor | None = None
        self.count = 0                                                    # tokens seen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])                            # [tokens, in]
        s = x.double().square().sum(0)                                    # [in]
        self.sq = s if self.sq is None else self.sq + s
        self.count += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()


@dataclasses.dataclass
class SparseGPTResult:
    W_hat: torch.Tensor          # [out, n] pruned (and rounded, with a spec) weights, W's dtype
    mask: torch.Tensor           # bool [out, n], True = kept
    codes: torch.Tensor | None   # [out, n] codes when jointly quantized (pruned weights hold the zero code)
    scale: torch.Tensor | None   # [out, G]
    zero: torch.Tensor | None    # [out, G]
    loss: float                  # Σ ((w - q) / U_qq)² / 2, the OBS error as GPTQ reports it


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, blocksize: int = 128,
                    percdamp: float = 0.01, spec: QuantSpec | None = None, scale_dtype: torch.dtype | None = None,
                    mask: torch.Tensor | None = None) -> SparseGPTResult:
    """Prune W [out, n] to `pattern` against the input Hessian H [n, n] (module docstring); with a spec,
    round the kept weights to its grid in the same pass (groups must tile the blocks: group_size a
    divisor of blocksize, or per channel). `mask` (bool [out, n], True = kept) fixes the mask instead of
    choosing it (tests). Works in float64 if W or H is float64, else float32."""
    n_out, n = W.shape
    if tuple(H.shape) != (n, n):
        raise LowbitError(f"sparsegpt: H must be [{n}, {n}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    check_fits(pattern, n)
    if pattern.structured and blocksize % pattern.m:
        raise LowbitError(f"sparsegpt: blocksize {blocksize} is not a multiple of M={pattern.m}")
    if spec is not None and not (spec.group_size == -1 or (spec.group_size > 0 and blocksize % spec.group_size == 0)):
        raise LowbitError(f"sparsegpt: joint quantization needs group_size -1 or a divisor of blocksize "
                          f"({blocksize}), got {spec.group_size}")
    if spec is not None and not spec.symmetric and spec.zero_point != "int":
        raise LowbitError("sparsegpt: joint quantization needs a grid that holds an exact 0 (symmetric, "
                          "or an integer zero point)")
    dt = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    W_dtype = W.dtype
    W = W.detach().to(dt, copy=True)                                      # [out, n]
    H = H.detach().to(device=W.device, dtype=dt, copy=True)              # [n, n]
    dead = H.diagonal() == 0                                              # inputs that were always 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    U, _, _ = _damped_inverse_cholesky(H, float(percdamp))               # [n, n] upper, (H + λI)⁻¹ = Uᵀ U
    del H

    keep = torch.ones(n_out, n, dtype=torch.bool, device=W.device) if mask is None else mask.to(W.device).clone()
    gs = spec.group_size if spec is not None else 0
    codes = scale = zero = None
    if spec is not None:
        G = 1 if gs == -1 else -(-n // gs)
        codes = torch.empty(n_out, n, dtype=spec.code_dtype, device=W.device)
        scale, zero = W.new_zeros(n_out, G), W.new_zeros(n_out, G)
        if gs == -1:
            scale[:, :1], zero[:, :1] = _row_params(W, spec, False, scale_dtype=scale_dtype)
    err2 = W.new_zeros(n_out)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()                                          # [out, c], eager in-block updates
        E = torch.zeros_like(W1)                                          # [out, c] scaled errors
        U1 = U[i1:i2, i1:i2]                                              # [c, c]
        d2 = U1.diagonal().square()[None, :]                             # [1, c]
        if mask is None and not pattern.structured:                      # one threshold for the block
            k = int(W1.numel() * pattern.fraction)
            if k:
                s = (W1.square() / d2).flatten()
                keep[:, i1:i2] = (s > s.kthvalue(k).values).reshape(W1.shape)
        for i in range(i2 - i1):
            j = i1 + i
            if mask is None and pattern.structured and i % pattern.m == 0:
                s = W1[:, i:i + pattern.m].square() / d2[:, i:i + pattern.m]   # [out, m]
                keep[:, j:j + pattern.m] = nm_mask(s, pattern.n, pattern.m)
            if spec is not None and gs > 0 and j % gs == 0:              # the group's range, current weights
                g = j // gs
                cur = W1[:, i:i + gs] * keep[:, j:j + gs]               # pruned weights do not widen it
                scale[:, g:g + 1], zero[:, g:g + 1] = _row_params(cur, spec, False, scale_dtype=scale_dtype)
            w = W1[:, i:i + 1]                                            # [out, 1]
            q = w * keep[:, j:j + 1]
            if spec is not None:
                g = 0 if gs == -1 else j // gs
                c = quantize(q, scale[:, g:g + 1], zero[:, g:g + 1], spec)  # a pruned 0 -> the zero code
                codes[:, j] = c[:, 0]
                q = dequantize(c, scale[:, g:g + 1], zero[:, g:g + 1], spec)
            e = (w - q) / U1[i, i]                                        # [out, 1]
            err2 += e[:, 0].square()
            W1[:, i:] -= e * U1[i:i + 1, i:]                              # column i becomes q
            W1[:, i] = q[:, 0]
            E[:, i] = e[:, 0]
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ U[i1:i2, i2:]                                    # lazy update of later blocks
    return SparseGPTResult(W.to(W_dtype), keep, codes, scale, zero, float(err2.sum()) / 2)


def density(W: torch.Tensor) -> float:
    """Fraction of non-zero weights."""
    return float((W != 0).sum()) / max(1, W.numel())


__all__ = ["Pattern", "parse_pattern", "nm_mask", "unstructured_mask", "pattern_mask", "magnitude_scores",
           "wanda_scores", "ColumnNorm", "sparsegpt_prune", "SparseGPTResult", "compress_nm", "decompress_nm",
           "density", "is_nm", "check_fits"]
