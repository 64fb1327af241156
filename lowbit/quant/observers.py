"""Range observers: tensor(s) -> per-group (lo, hi) to feed primitives.qparams / fake_quantize.

Every observer is built from a QuantSpec (its group_size sets the granularity, its bits
and symmetry matter for MSE/KL) and used either in one shot, `obs(x)`, or over several
calibration batches, `obs.update(x1); obs.update(x2); obs.compute()`. Results come back
in the grouped keepdim layout of primitives.to_groups: [..., G, 1], or [1, ..., 1] per
tensor. Per-group accumulation needs every batch to have the same leading shape (it is
meant for weights); per-tensor accumulation (activations) accepts any shapes.

What each one keeps between batches, and why:
  minmax      running min / max per group (exact, O(groups) memory).
  percentile  the values themselves: per-group, all of them (weights are seen once);
  mse         per-tensor, a uniform random sample of at most max_samples (2^24) values,
              kept by bottom-k random keys so that every value seen has the same chance
              whatever the batch it came in. Exact for small inputs, unbiased for big ones.
  kl          a histogram of |x| (2048 bins, per tensor only, as TensorRT). When a batch
              exceeds the current range the range doubles and bin pairs merge, which
              re-bins exactly (no interpolation; only a value lying exactly on the old
              upper edge lands one bin low) at the cost of up to 2x coarser bins.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec, dequantize, group_dims, qparams, quantize, to_groups, weight_parts


def _as_work(x: torch.Tensor) -> torch.Tensor:
    # Own copy in float32 (float64 stays float64) so later caller edits don't leak in.
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().to(dt, copy=True)


class Observer:
    """Base class: update(x) any number of times, then compute() -> (lo, hi)."""

    name = "base"

    def __init__(self, spec: QuantSpec | None = None):
        self.spec = spec if spec is not None else QuantSpec(bits=8, symmetric=True, group_size=0)
        if not isinstance(self.spec, QuantSpec):
            raise LowbitError(f"spec must be a QuantSpec, got {type(self.spec).__name__}")
        self.reset()

    @property
    def per_tensor(self) -> bool:
        return self.spec.group_size == 0

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._lead = None  # grouped leading shape [..., G] (per-group) or ndim (per-tensor)

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped work copy [..., G, g]; checks that batches agree on the leading shape."""
        xg = to_groups(_as_work(x), self.spec.group_size)  # [..., G, g]
        lead = x.ndim if self.per_tensor else tuple(xg.shape[:-1])
        if self._lead is None:
            self._lead = lead
        elif not self.per_tensor and lead != self._lead:
            raise LowbitError(
                f"{self.name} observer: batch has grouped shape {lead} but earlier batches had {self._lead}; "
                "per-group accumulation needs equal leading dims (use group_size=0 for activations)")
        return xg

    def _tensor_shape(self) -> list[int]:
        return [1] * (self._lead + 1)  # per-tensor keepdim layout for an ndim-dim input

    def _require_data(self):
        if self._lead is None:
            raise LowbitError(f"{self.name} observer: compute() called before any update(x)")

    def update(self, x: torch.Tensor) -> "Observer":
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One-shot: reset, observe x, compute."""
        self.reset()
        return self.update(x).compute()


class MinMaxObserver(Observer):
    """Plain min / max per group; running over batches."""

    name = "minmax"

    def reset(self):
        super().reset()
        self._lo = self._hi = None

    def update(self, x):
        xg = self._group(x)  # [..., G, g]
        dims = group_dims(xg, self.spec.group_size)
        lo = xg.amin(dim=dims, keepdim=True)  # [..., G, 1]
        hi = xg.amax(dim=dims, keepdim=True)
        if self.per_tensor:
            lo, hi = lo.reshape(()), hi.reshape(())  # batches may differ in ndim
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        return self

    def compute(self):
        self._require_data()
        if self.per_tensor:
            shape = self._tensor_shape()
            return self._lo.reshape(shape), self._hi.reshape(shape)
        return self._lo, self._hi


class _SampleObserver(Observer):
    """Keeps the values (see module docstring) and computes on them at compute()."""

    def __init__(self, spec=None, max_samples: int = 1 << 24, seed: int = 0):
        if max_samples < 1:
            raise LowbitError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples, self.seed = int(max_samples), seed
        super().__init__(spec)

    def reset(self):
        super().reset()
        self._chunks = []  # per-group: grouped tensors [..., G, g_i]
        self._vals = self._keys = None  # per-tensor: flat sample and its random keys
        self._gen = torch.Generator().manual_seed(self.seed)

    def update(self, x):
        xg = self._group(x)  # [..., G, g]
        if not self.per_tensor:
            self._chunks.append(xg)
            return self
        v = xg.reshape(-1)  # [n]
        k = torch.rand(v.numel(), generator=self._gen).to(v.device)  # [n]
        if self._vals is not None:
            v, k = torch.cat([self._vals, v]), torch.cat([self._keys, k])
        if v.numel() > self.max_samples:  # bottom-k keys = uniform sample without replacement
            idx = torch.topk(k, self.max_samples, largest=False, sorted=False).indices
            v, k = v[idx], k[idx]
        self._vals, self._keys = v, k
        return self

    def _samples(self) -> torch.Tensor:
        """All kept values in a grouped layout: [..., G, N] per group, [1, N] per tensor."""
        self._require_data()
        if self.per_tensor:
            return self._vals.unsqueeze(0)  # [1, N]; group_dims(., 0) reduces over both dims
        return torch.cat(self._chunks, dim=-1)  # [..., G, N]

    def _finish(self, lo, hi):
        if self.per_tensor:
            shape = self._tensor_shape()
            return lo.reshape(shape), hi.reshape(shape)
        return lo, hi


class PercentileObserver(_SampleObserver):
    """Clip at a percentile: of |x| when symmetric (lo = -hi), of each tail when asymmetric.

    Nearest-rank definition via kthvalue (no interpolation, no torch.quantile size limit).
    """

    name = "percentile"

    def __init__(self, spec=None, percentile: float = 99.99, max_samples: int = 1 << 24, seed: int = 0):
        if not 0 < percentile <= 100:
            raise LowbitError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        super().__init__(spec, max_samples, seed)

    def compute(self):
        xs = self._samples()  # [..., G, N]
        n = xs.shape[-1]
        k = min(n, max(1, math.ceil(self.percentile / 100 * n)))  # rank of the upper cut
        if self.spec.symmetric:
            hi = xs.abs().kthvalue(k, dim=-1, keepdim=True).values  # [..., G, 1]
            lo = -hi
        else:
            hi = xs.kthvalue(k, dim=-1, keepdim=True).values
            lo = xs.kthvalue(n - k + 1, dim=-1, keepdim=True).values  # mirrored rank
        return self._finish(lo, hi)


class MSEObserver(_SampleObserver):
    """Per-group grid search of a shrink factor p: range p*(lo, hi) minimising sum |x - fq(x)|^norm.

    Vectorised over groups; one pass over the data per grid point. p runs from 1.0 down
    to min_shrink in `steps` steps (p = 1 is plain min-max, so MSE never does worse).
    """

    name = "mse"

    def __init__(self, spec=None, steps: int = 100, min_shrink: float = 0.2, norm: float = 2.0,
                 max_samples: int = 1 << 24, seed: int = 0):
        if steps < 1:
            raise LowbitError(f"steps must be >= 1, got {steps}")
        if not 0 < min_shrink <= 1:
            raise LowbitError(f"min_shrink must be in (0, 1], got {min_shrink}")
        if norm <= 0:
            raise LowbitError(f"norm must be > 0, got {norm}")
        self.steps, self.min_shrink, self.norm = int(steps), float(min_shrink), float(norm)
        super().__init__(spec, max_samples, seed)

    def compute(self):
        xs = self._samples()  # [..., G, N] (per-tensor: [1, N])
        dims = group_dims(xs, self.spec.group_size)
        lo = xs.amin(dim=dims, keepdim=True)  # [..., G, 1]
        hi = xs.amax(dim=dims, keepdim=True)
        best_err = torch.full_like(lo, math.inf)
        best_p = torch.ones_like(lo)
        for p in torch.linspace(1.0, self.min_shrink, self.steps, dtype=xs.dtype).tolist():
            scale, zero = qparams(p * lo, p * hi, self.spec)
            xq = dequantize(quantize(xs, scale, zero, self.spec), scale, zero, self.spec)  # [..., G, N]
            err = (xq - xs).abs_().pow_(self.norm).sum(dim=dims, keepdim=True)  # [..., G, 1]
            better = err < best_err  # strict: ties keep the wider range
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, torch.full_like(best_p, p), best_p)
        return self._finish(best_p * lo, best_p * hi)


class KLObserver(Observer):
    """TensorRT entropy calibration, per tensor: the |x| threshold minimising KL(P || Q).

    For each candidate of i kept bins (min_bins..bins): P = hist[:i] with the outlier
    mass folded into bin i-1; Q = hist[:i] merged into 2^(bits-1) levels and spread
    evenly back over the bins where P is nonzero. Threshold = i * bin_width.
    Symmetric specs get (-T, T); asymmetric ones (max(min, -T), min(max, T)).
    """

    name = "kl"

    def __init__(self, spec=None, bins: int = 2048, min_bins: int = 128):
        self.bins, self.min_bins = int(bins), int(min_bins)
        super().__init__(spec)
        if not self.per_tensor:
            raise LowbitError(f"kl observer supports only per-tensor ranges (group_size=0), got {self.spec.group_size}")
        levels = 1 << (self.spec.bits - 1)
        if self.bins % 2 or not levels <= self.min_bins <= self.bins:
            raise LowbitError(f"kl observer needs even bins >= min_bins >= {levels} levels, "
                              f"got bins={self.bins}, min_bins={self.min_bins}")

    def reset(self):
        super().reset()
        self._hist = None  # float64 [bins] counts of |x| over [0, _range]
        self._range = 0.0
        self._lo = self._hi = None

    def update(self, x):
        xg = self._group(x)  # [..., 1, d]
        a = xg.abs().reshape(-1).float()  # [n]
        lo, hi = xg.min(), xg.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        m = float(a.max()) if a.numel() else 0.0
        if self._hist is None:
            self._hist = torch.zeros(self.bins, dtype=torch.float64)
        if self._range == 0.0 and m > 0:
            self._range = m  # first nonzero data sets the range; earlier zeros all sit in bin 0
        while m > self._range:  # double the range: merge bin pairs, new top half empty
            half = self._hist.view(-1, 2).sum(1)  # [bins/2]
            self._hist = torch.cat([half, torch.zeros_like(half)])  # [bins]
            self._range *= 2
        if self._range == 0.0:
            self._hist[0] += a.numel()
        else:
            self._hist += torch.histc(a, self.bins, 0.0, self._range).to(torch.float64).cpu()
        return self

    def histogram(self) -> tuple[torch.Tensor, float]:
        """(counts float64 [bins], upper edge R): bin k covers |x| in [k, k+1) * R / bins."""
        self._require_data()
        return self._hist.clone(), self._range

    def threshold(self) -> float:
        """The chosen |x| clipping threshold T (0 for all-zero data)."""
        self._require_data()
        if self._range == 0.0:
            return 0.0
        hist, levels = self._hist, 1 << (self.spec.bits - 1)
        width = self._range / self.bins
        tail = torch.cat([hist.flip(0).cumsum(0).flip(0), hist.new_zeros(1)])  # [bins+1], mass of bins >= i
        j = torch.arange(self.bins)  # [B] bin index
        best_kl, best_i = math.inf, self.bins
        # Vectorised over blocks of candidate thresholds (256 x bins float64 matrices, 4 MB each).
        for start in range(self.min_bins, self.bins + 1, 256):
            cand = torch.arange(start, min(start + 256, self.bins + 1))  # [C] bins kept
            kept = j[None, :] < cand[:, None]  # [C, B]
            ref = hist[None, :] * kept  # [C, B] histogram clipped to the first i bins
            p = ref.clone()
            p[torch.arange(len(cand)), cand - 1] += tail[cand]  # fold outliers into the last kept bin
            nz = (p > 0).to(torch.float64)  # [C, B]
            # Level of each kept bin (i bins -> `levels` levels); dropped bins go to a dummy level.
            level = torch.where(kept, j[None, :] * levels // cand[:, None], levels)  # [C, B]
            mass = hist.new_zeros(len(cand), levels + 1).scatter_add_(1, level, ref)  # [C, L+1]
            cnt = hist.new_zeros(len(cand), levels + 1).scatter_add_(1, level, nz)
            q = nz * (mass / cnt.clamp(min=1)).gather(1, level)  # [C, B], spread over nonzero bins
            pn = p / p.sum(1, keepdim=True)
            qn = q / q.sum(1, keepdim=True).clamp(min=1e-300)
            terms = torch.where(p > 0, pn * (pn / qn).log(), torch.zeros_like(pn))  # inf where q = 0 < p
            kl = terms.sum(1)  # [C]
            k = int(kl.argmin())  # first minimum = smallest threshold among ties
            if float(kl[k]) < best_kl:
                best_kl, best_i = float(kl[k]), int(cand[k])
        return best_i * width

    def compute(self):
        t = self.threshold()
        shape = self._tensor_shape()
        t_lo = torch.full((), -t, dtype=self._lo.dtype, device=self._lo.device)
        t_hi = torch.full((), t, dtype=self._hi.dtype, device=self._hi.device)
        if self.spec.symmetric:
            return t_lo.reshape(shape), t_hi.reshape(shape)
        return torch.maximum(self._lo, t_lo).reshape(shape), torch.minimum(self._hi, t_hi).reshape(shape)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def get_observer(name: str, spec: QuantSpec | None = None, **kwargs) -> Observer:
    """Build a registered observer by name, e.g. get_observer("mse", spec, steps=50)."""
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer {name!r}; valid names: {', '.join(sorted(OBSERVERS))}")
    try:
        return OBSERVERS[name](spec, **kwargs)
    except TypeError as e:  # bad keyword for this observer
        raise LowbitError(f"observer {name!r}: {e}") from None


def observe(x: torch.Tensor, spec: QuantSpec, method: str = "minmax", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot (lo, hi) of x for spec's granularity with the named observer."""
    return get_observer(method, spec, **kwargs)(x)


def observe_weight(w: torch.Tensor, spec: QuantSpec, method: str = "minmax",
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """observe() of a weight w [out, in] by primitives.weight_parts: the short last group a group size not
    dividing `in` leaves is observed on its own -> (lo, hi) [rows, G, 1] for primitives.quantize_weight."""
    los, his = zip(*(observe(w[:, cols], sub, method, **kwargs) for cols, sub, _ in weight_parts(spec, w.shape[1])))
    return torch.cat(los, 1), torch.cat(his, 1)
