"""Pruning as methods: magnitude, Wanda (Sun et al., 2023) and SparseGPT (Frantar & Alistarh, 2023), to an
N:M pattern or an unstructured fraction (the math is lowbit.quant.sparsity); SparseGPT optionally rounds
the kept weights to a k-bit grid in the same pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import SparseLinear, WeightOnlyLinear
from lowbit.quant.gptq_core import HessianAccumulator
from lowbit.quant.registry import Method, MethodConfig, Quantized, option, register
from lowbit.quant.sparsity import (ColumnNorm, check_fits, density, magnitude_scores, parse_pattern,
                                   pattern_mask, sparsegpt_prune, wanda_scores)

STORE_DTYPE = torch.float16   # the pruned layers' weights, as the other methods store scales


@dataclass
class SparsityConfig(MethodConfig):
    sparsity: str = option("2:4", "N:M (keep N of every M weights along the input: 2:4, 4:8) or a fraction "
                                  "of the weights to prune (0.5)")

    def __post_init__(self):
        self.pattern = parse_pattern(self.sparsity)   # a clear error before any work


class _Pruning(Method):
    config_cls = SparsityConfig

    def scores(self, W: torch.Tensor, stats) -> torch.Tensor:
        raise NotImplementedError

    def quantize_linear(self, ctx, name, linear, stats):
        p = self.cfg.pattern
        W = linear.weight.detach().float()                                # [out, in]
        check_fits(p, W.shape[1])
        keep = pattern_mask(self.scores(W, stats), p)                     # the mask, then its application
        layer = SparseLinear.from_linear(linear, keep, p.n, p.m, dtype=STORE_DTYPE)
        return Quantized(layer, {"density": density(layer.dequantized_weight())})


@register("magnitude")
class Magnitude(_Pruning):
    """Prune the smallest |w| (per row, or per group of M)."""

    def scores(self, W, stats):
        return magnitude_scores(W)


@register("wanda")
class Wanda(_Pruning):
    """Prune the smallest |w_ij| · ||X_j||₂ (per row, or per group of M), X from calibration."""
    needs_calibration = True
    shares_input_stats = True

    def collector(self, ctx, name, linear):
        return ColumnNorm()

    def scores(self, W, stats: ColumnNorm):
        if stats.sq is None:
            raise LowbitError("wanda: the layer saw no calibration inputs")
        return wanda_scores(W, stats.norm())


@dataclass
class SparseGPTConfig(SparsityConfig):
    bits: int = option(0, "also round the kept weights to this many bits in the same pass (0: keep them in "
                          "16-bit floats)")
    group_size: int = option(128, "with --bits: weights per scale along the input (a divisor of --blocksize), "
                                  "or -1 per output channel")
    sym: bool = option(False, "with --bits: symmetric grid (no zero point)")
    blocksize: int = option(128, "columns per lazy-batch block (and per unstructured mask choice)")
    percdamp: float = option(0.01, "dampening, a fraction of the mean Hessian diagonal")

    def __post_init__(self):
        super().__post_init__()
        if self.bits and not 2 <= self.bits <= 8:
            raise LowbitError(f"--bits: expected 0 or 2..8, got {self.bits}")

    def spec(self) -> QuantSpec | None:
        return QuantSpec(bits=self.bits, symmetric=self.sym, group_size=self.group_size) if self.bits else None


@register("sparsegpt")
class SparseGPT(Method):
    """OBS pruning with the layer Hessian (the walk's HessianAccumulator, as GPTQ), lazy batch updates."""
    config_cls = SparseGPTConfig
    needs_calibration = True
    shares_input_stats = True
    true_sequential = True

    def collector(self, ctx, name, linear):
        return HessianAccumulator()

    def quantize_linear(self, ctx, name, linear, stats: HessianAccumulator):
        c, p = self.cfg, self.cfg.pattern
        spec = c.spec()
        res = sparsegpt_prune(linear.weight.detach().float(), stats.H, p, blocksize=c.blocksize,
                              percdamp=c.percdamp, spec=spec, scale_dtype=STORE_DTYPE)
        extra = {"density": float(res.mask.float().mean()), "sparsegpt_loss": res.loss}
        if spec is None:
            return Quantized(SparseLinear.from_weight(res.W_hat, p.n, p.m, linear.bias, STORE_DTYPE), extra)
        n = linear.in_features
        ragged = spec.group_size > 0 and n % spec.group_size != 0
        g_idx = (torch.arange(n) // spec.group_size).to(torch.int32) if ragged else None
        layer = WeightOnlyLinear.from_quantized(res.codes, res.scale, None if spec.symmetric else res.zero, spec,
                                                linear.bias, g_idx=g_idx, dtype=STORE_DTYPE)
        return Quantized(layer, extra)
