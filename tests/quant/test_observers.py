"""lowbit.quant.observers on known distributions, plus accumulation and bad input."""

import math

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.observers import (
    OBSERVERS, KLObserver, MinMaxObserver, MSEObserver, PercentileObserver, get_observer, observe,
)
from lowbit.kernels.primitives import QuantSpec, fake_quantize, to_groups

PT8 = QuantSpec(bits=8, symmetric=True, group_size=0)


def _gauss_with_outliers(n=1 << 18, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n // 4, generator=g)
    x[0, :4] = torch.tensor([40.0, -38.0, 35.0, -40.0])  # a few huge outliers (unit sigma bulk)
    return x


def _heavy_tailed(shape=(64, 256), seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(3.0)).sample(shape)


def test_outliers_minmax_vs_clipping_observers():
    x = _gauss_with_outliers()
    lo, hi = observe(x, PT8, "minmax")
    assert lo.shape == (1, 1, 1) and float(hi) == 40.0 and float(lo) == -40.0
    for name in ("kl", "percentile"):
        lo, hi = observe(x, PT8, name)
        assert 2.0 < float(hi) < 6.0, (name, float(hi))
        assert float(lo) == -float(hi)
    # Asymmetric: each tail clipped on its own, still inside the bulk.
    asym = QuantSpec(bits=8, symmetric=False, group_size=0)
    for name in ("kl", "percentile"):
        lo, hi = observe(x, asym, name)
        assert -6.0 < float(lo) < -2.0 and 2.0 < float(hi) < 6.0


def test_percentile_matches_nearest_rank():
    x = torch.randn(1000, dtype=torch.float64)
    lo, hi = PercentileObserver(PT8, percentile=99.0)(x)
    ref = np.sort(np.abs(x.numpy()))[math.ceil(0.99 * 1000) - 1]
    assert float(hi) == ref and float(lo) == -ref
    # Per-group (weights): one threshold per group, vectorised.
    w = torch.randn(8, 256)
    spec = QuantSpec(bits=4, symmetric=True, group_size=64)
    lo, hi = PercentileObserver(spec, percentile=90.0)(w)
    assert hi.shape == (8, 4, 1)
    ref = to_groups(w, 64).abs().sort(-1).values[..., math.ceil(0.9 * 64) - 1 : math.ceil(0.9 * 64)]
    assert torch.equal(hi, ref)
    assert torch.equal(PercentileObserver(spec, percentile=100.0)(w)[1], to_groups(w, 64).abs().amax(-1, keepdim=True))


def _kl_reference(hist, bins, min_bins, levels):
    """Loop-over-thresholds numpy version of TensorRT's entropy calibration (returns kept bins)."""
    best, best_i = math.inf, bins
    for i in range(min_bins, bins + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        level = np.arange(i) * levels // i
        nz = p > 0
        mass = np.bincount(level, weights=hist[:i], minlength=levels)
        cnt = np.bincount(level, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, mass[level] / np.maximum(cnt[level], 1), 0.0)
        if np.any(nz & (q == 0)):
            continue
        pn, qn = p[nz] / p.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best - 1e-12:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize("bits", [8, 6])
def test_kl_matches_loop_reference(bits):
    x = _gauss_with_outliers(1 << 16, seed=bits)
    obs = KLObserver(QuantSpec(bits=bits, symmetric=True, group_size=0), bins=512, min_bins=128)
    obs.update(x)
    hist, rng = obs.histogram()
    assert hist.sum() == x.numel() and rng == 40.0
    i = _kl_reference(hist.numpy(), 512, 128, 1 << (bits - 1))
    assert obs.threshold() == pytest.approx(i * rng / 512, rel=1e-12)


def test_minmax_accumulation_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s, generator=g) * (k + 1) for k, s in enumerate([(3, 64), (5, 2, 64), (64,)])]
    obs = MinMaxObserver(PT8)
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute()
    flat = torch.cat([b.reshape(-1) for b in batches])
    assert float(lo) == float(flat.min()) and float(hi) == float(flat.max())
    # Per-channel over batches of the same shape == one pass over the concatenation of rows' inputs.
    ch = QuantSpec(bits=8, symmetric=False, group_size=-1)
    ws = [torch.randn(8, 64, generator=g) for _ in range(3)]
    obs = get_observer("minmax", ch)
    for w in ws:
        obs.update(w)
    ref = observe(torch.cat(ws, dim=-1), ch, "minmax")
    assert torch.equal(obs.compute()[0], ref[0]) and torch.equal(obs.compute()[1], ref[1])


def test_sample_accumulation():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 128, generator=g) for _ in range(3)]
    obs = PercentileObserver(PT8, percentile=99.9)
    for b in batches:
        obs.update(b)
    assert torch.equal(obs.compute()[1], PercentileObserver(PT8, percentile=99.9)(torch.cat(batches))[1])
    # Over max_samples: a uniform subsample; the 99th percentile of |N(0,1)| is 2.576.
    obs = PercentileObserver(PT8, percentile=99.0, max_samples=20000)
    for _ in range(5):
        obs.update(torch.randn(40000, generator=g))
    assert obs._vals.numel() == 20000
    assert abs(float(obs.compute()[1]) - 2.576) < 0.1


def test_kl_accumulation_with_growing_range():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(1 << 15, generator=g) for _ in range(3)]
    batches[0][0] = 5.0  # first batch sets the range to 5
    batches[1][:2] = torch.tensor([13.0, -20.0])  # second doubles it twice, to exactly 20
    obs = KLObserver(PT8)
    for b in batches:
        obs.update(b)
    hist, rng = obs.histogram()
    one = KLObserver(PT8)
    one.update(torch.cat(batches))
    hist1, rng1 = one.histogram()
    # Doubling merges bin pairs, so the re-binned histogram equals a one-pass histogram, except
    # the old maximum (5.0, on the old closed upper edge) which now sits one bin lower.
    assert rng == rng1 == 20.0 and hist.sum() == hist1.sum() == 3 * (1 << 15)
    assert (hist - hist1).abs().sum() == 2 and hist[511] - hist1[511] == 1
    assert obs.threshold() == one.threshold() and 2.0 < obs.threshold() < 6.0


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, -1, 128])
def test_mse_clipping_beats_minmax_on_heavy_tails(bits, symmetric, group_size):
    w = _heavy_tailed(seed=bits)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    lo, hi = MSEObserver(spec, steps=40)(w)
    err_mm = to_groups((fake_quantize(w, spec) - w) ** 2, group_size).sum(-1)
    err_mse = to_groups((fake_quantize(w, spec, lo, hi) - w) ** 2, group_size).sum(-1)
    assert err_mse.sum() < err_mm.sum()
    if group_size != 0:  # p = 1 is on the grid, so no group gets worse
        assert torch.all(err_mse <= err_mm * (1 + 1e-5) + 1e-6)


def test_mse_matches_brute_force_single_group():
    w = _heavy_tailed((1, 128), seed=5).double()
    spec = QuantSpec(bits=3, symmetric=False, group_size=-1)
    lo, hi = MSEObserver(spec, steps=25, min_shrink=0.4)(w)
    best, best_p = math.inf, None
    for p in np.linspace(1.0, 0.4, 25):
        e = float(((fake_quantize(w, spec, p * w.min().view(1, 1, 1), p * w.max().view(1, 1, 1)) - w) ** 2).sum())
        if e < best:
            best, best_p = e, p
    assert float(hi) == pytest.approx(best_p * float(w.max()), rel=1e-12)
    assert float(lo) == pytest.approx(best_p * float(w.min()), rel=1e-12)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_all_zero_input_gives_finite_ranges(name):
    lo, hi = get_observer(name, PT8)(torch.zeros(4, 64))
    assert float(lo) == 0.0 and float(hi) == 0.0
    assert torch.all(fake_quantize(torch.zeros(4, 64), PT8, lo, hi) == 0)


def test_output_shapes_follow_spec():
    w = torch.randn(16, 256)
    for name in ("minmax", "percentile", "mse"):
        assert get_observer(name, QuantSpec(4, False, 32))(w)[0].shape == (16, 8, 1)
        assert get_observer(name, QuantSpec(4, False, -1))(w)[0].shape == (16, 1, 1)
        assert get_observer(name, QuantSpec(4, False, 0))(w)[0].shape == (1, 1, 1)


def test_bad_input():
    with pytest.raises(LowbitError, match="unknown observer 'histogramx'; valid names: kl, minmax, mse, percentile"):
        get_observer("histogramx")
    with pytest.raises(LowbitError, match="per-tensor"):
        get_observer("kl", QuantSpec(bits=8, group_size=128))
    with pytest.raises(LowbitError, match="observer 'mse'"):
        get_observer("mse", PT8, percentile=99.0)
    with pytest.raises(LowbitError, match="percentile must be"):
        PercentileObserver(PT8, percentile=0)
    with pytest.raises(LowbitError, match="before any update"):
        MinMaxObserver(PT8).compute()
    obs = MinMaxObserver(QuantSpec(bits=4, group_size=32))
    obs.update(torch.randn(4, 64))
    with pytest.raises(LowbitError, match="equal leading dims"):
        obs.update(torch.randn(5, 64))
    with pytest.raises(LowbitError, match="does not divide"):
        observe(torch.randn(4, 100), QuantSpec(bits=4, group_size=32), "mse")
