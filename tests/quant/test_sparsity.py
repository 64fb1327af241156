"""Sparsity math (lowbit.quant.sparsity) against slow direct float64 implementations of the papers'
definitions: masks, Wanda's norms, and SparseGPT's blocked OBS pruning against a column-by-column OBS loop
on the full inverse Hessian."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec, dequantize
from lowbit.quant.sparsity import (ColumnNorm, Pattern, nm_mask, parse_pattern, sparsegpt_prune,
                                   unstructured_mask, wanda_scores)


def test_parse_pattern():
    assert parse_pattern("2:4") == Pattern(n=2, m=4) and parse_pattern(" 4:8") == Pattern(n=4, m=8)
    assert parse_pattern("0.5") == Pattern(fraction=0.5) and parse_pattern(0.25).density == 0.75
    for bad in ("4:2", "0:4", "2:", "a:b", "1.5", "0", "x"):
        with pytest.raises(LowbitError, match="--sparsity"):
            parse_pattern(bad)


def test_nm_mask_keeps_the_n_largest_of_every_m():
    s = torch.rand(7, 24, generator=torch.Generator().manual_seed(0))
    keep = nm_mask(s, 2, 4)
    for r in range(7):
        for g in range(6):
            grp = s[r, 4 * g:4 * g + 4]
            want = torch.zeros(4, dtype=torch.bool)
            want[sorted(range(4), key=lambda i: -float(grp[i]))[:2]] = True
            assert torch.equal(keep[r, 4 * g:4 * g + 4], want)


def test_unstructured_mask_prunes_the_fraction_per_row():
    s = torch.rand(5, 40, generator=torch.Generator().manual_seed(1))
    keep = unstructured_mask(s, 0.3)
    assert bool((keep.sum(1) == 28).all())
    assert bool((s[~keep].reshape(5, 12).amax(1) < s.masked_fill(~keep, 2).amin(1)).all())


def test_wanda_norm_is_the_feature_norm_over_tokens():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 5, 16, generator=g) for _ in range(3)]
    acc = ColumnNorm()
    for x in xs:
        acc.update(x)
    X = torch.cat([x.reshape(-1, 16) for x in xs]).double()               # [45, 16]
    assert torch.allclose(acc.norm(), torch.linalg.norm(X, dim=0), rtol=1e-12)
    W = torch.randn(4, 16, generator=g).double()
    assert torch.allclose(wanda_scores(W, acc.norm()), W.abs() * X.norm(dim=0)[None], rtol=1e-12)


def _problem(out=12, n=32, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g,
                                                                                  dtype=torch.float64)
    H = 2 * X.t() @ X / tokens                                            # correlated inputs
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    return W, H


def naive_sparsegpt(W, H, pattern: Pattern, blocksize, percdamp=0.01, keep=None):
    """OBS one column at a time on the full inverse: a pruned w_q moves the later weights of its row by
    -w_q / [H⁻¹]_qq · H⁻¹_{q,:}, then q is eliminated from H⁻¹. The mask, when not given, is chosen as
    SparseGPT does from w² / d_q², d_q² = [H⁻¹ with columns < q eliminated]_qq."""
    W, H = W.clone(), H.clone()
    n = H.shape[0]
    H += percdamp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    d2 = torch.empty(n, dtype=H.dtype)
    S = Hinv.clone()
    for j in range(n):
        d2[j] = S[j, j]
        S = S - torch.outer(S[:, j], S[j, :]) / S[j, j]
    chosen = keep is None
    keep = torch.ones_like(W, dtype=torch.bool) if chosen else keep.clone()
    S = Hinv.clone()
    for q in range(n):
        if chosen and pattern.structured and q % pattern.m == 0:
            s = W[:, q:q + pattern.m] ** 2 / d2[q:q + pattern.m]
            for r in range(W.shape[0]):
                order = sorted(range(pattern.m), key=lambda i: float(s[r, i]))
                for i in order[:pattern.m - pattern.n]:
                    keep[r, q + i] = False
        if chosen and not pattern.structured and q % blocksize == 0:
            s = (W[:, q:q + blocksize] ** 2 / d2[q:q + blocksize]).flatten()
            k = int(s.numel() * pattern.fraction)
            smallest = set(sorted(range(s.numel()), key=lambda i: float(s[i]))[:k])
            width = min(blocksize, n - q)
            for i in smallest:
                keep[i // width, q + i % width] = False
        for r in range(W.shape[0]):
            if not keep[r, q]:
                W[r, q:] -= W[r, q] / S[q, q] * S[q, q:]
        S = S - torch.outer(S[:, q], S[q, :]) / S[q, q]
    return W * keep, keep


@pytest.mark.parametrize("pattern,blocksize", [(Pattern(n=2, m=4), 8), (Pattern(n=4, m=8), 16),
                                               (Pattern(fraction=0.5), 8), (Pattern(fraction=0.3), 32)])
def test_sparsegpt_equals_column_by_column_obs(pattern, blocksize):
    W, H = _problem()
    res = sparsegpt_prune(W, H, pattern, blocksize=blocksize)
    ref_W, ref_keep = naive_sparsegpt(W, H, pattern, blocksize)
    assert torch.equal(res.mask, ref_keep)
    assert torch.allclose(res.W_hat, ref_W, atol=1e-9, rtol=1e-9)
    assert bool((res.W_hat[~res.mask] == 0).all())


def test_sparsegpt_with_a_given_mask_is_obs_with_that_mask():
    W, H = _problem(seed=3)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(4)) > 0.4
    res = sparsegpt_prune(W, H, Pattern(fraction=0.4), blocksize=8, mask=keep)
    ref_W, _ = naive_sparsegpt(W, H, Pattern(fraction=0.4), 8, keep=keep)
    assert torch.equal(res.mask, keep) and torch.allclose(res.W_hat, ref_W, atol=1e-9, rtol=1e-9)


def test_sparsegpt_loses_less_than_magnitude_on_the_layer_objective():
    W, H = _problem(out=32, n=64, seed=5)
    res = sparsegpt_prune(W, H, Pattern(n=2, m=4), blocksize=16)
    mag = W * nm_mask(W.abs(), 2, 4)

    def err(Wh):
        D = W - Wh
        return float(torch.einsum("ri,ij,rj->", D, H, D))
    assert err(res.W_hat) < 0.8 * err(mag)                                # measured ratio 0.56


def test_joint_quantization_keeps_exact_zeros_and_the_grid():
    W, H = _problem(out=8, n=64, seed=6)
    spec = QuantSpec(bits=4, symmetric=False, group_size=16)
    res = sparsegpt_prune(W, H, Pattern(n=2, m=4), blocksize=32, spec=spec)
    g = torch.arange(64) // 16
    deq = dequantize(res.codes, res.scale[:, g], res.zero[:, g], spec)
    assert torch.equal(deq, res.W_hat) and bool((deq[~res.mask] == 0).all())
    assert bool(((deq != 0).reshape(8, 16, 4).sum(-1) <= 2).all())


def test_joint_quantization_refuses_what_it_cannot_hold():
    W, H = _problem(out=4, n=32)
    with pytest.raises(LowbitError, match="exact 0"):
        sparsegpt_prune(W, H, Pattern(n=2, m=4), spec=QuantSpec(bits=4, group_size=16, zero_point="float"),
                        blocksize=32)
    with pytest.raises(LowbitError, match="divisor"):
        sparsegpt_prune(W, H, Pattern(n=2, m=4), spec=QuantSpec(bits=4, group_size=24), blocksize=32)
