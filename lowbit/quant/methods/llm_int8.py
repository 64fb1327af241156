"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 with a float path for outlier feature dims.

No calibration is needed: outlier dims are found per forward call (see lowbit.layers.mixed_int8). With
calibration data, a collector records which input dims of every Linear crossed the threshold, reported per
layer (`outlier_fraction` etc. in the walk report); with keep_outlier_weights those dims' original weight
columns are also stored next to the int8 weight, so the float path multiplies them by the unquantized weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.layers.mixed_int8 import DEFAULT_THRESHOLD, MixedInt8Linear, _check_threshold
from lowbit.quant.registry import Method, MethodConfig, Quantized, option, register


@dataclass
class LLMInt8Config(MethodConfig):
    threshold: float = option(DEFAULT_THRESHOLD, "|x| >= threshold marks an outlier feature dim (0: plain int8)")
    keep_outlier_weights: bool = option(True, "with calibration: keep the original weight columns of the "
                                              "outlier dims it saw")
    max_kept_fraction: float = option(0.1, "at most this fraction of a layer's input dims kept (most frequent "
                                           "first)")

    def __post_init__(self):
        _check_threshold(self.threshold)
        if not 0 <= self.max_kept_fraction <= 1:
            raise LowbitError(f"--max-kept-fraction: expected a fraction in [0, 1], got {self.max_kept_fraction!r}")


class OutlierStats:
    """Which input dims of one Linear reach |x| >= threshold on calibration data, and how often."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.col_hits: torch.Tensor | None = None   # [in] int64: calls in which the dim was an outlier
        self.calls = 0                              # forward calls seen (the walk runs 8 windows per call)
        self.values = 0                             # outlier values seen
        self.total = 0                              # values seen

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])                                   # [rows, in]
        mask = x.abs() >= self.threshold if self.threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
        hit = mask.any(0).long().cpu()                                            # [in]
        self.col_hits = hit if self.col_hits is None else self.col_hits + hit
        self.calls += 1
        self.values += int(mask.sum())
        self.total += mask.numel()

    def outlier_dims(self) -> torch.Tensor:
        """Input dims that were outliers in at least one call, most frequent first (int64 [k])."""
        if self.col_hits is None:
            return torch.empty(0, dtype=torch.long)
        dims = self.col_hits.nonzero().flatten()
        order = torch.sort(self.col_hits[dims], descending=True, stable=True).indices
        return dims[order]

    def report(self) -> dict:
        if self.col_hits is None:
            return {}
        n_in = self.col_hits.numel()
        return {"outlier_fraction": self.outlier_dims().numel() / n_in,          # dims ever routed to float
                "outlier_dims": int(self.outlier_dims().numel()),
                "mean_call_outlier_fraction": float(self.col_hits.sum()) / (self.calls * n_in),
                "outlier_value_fraction": self.values / max(self.total, 1)}


@register("llm-int8")
class LLMInt8(Method):
    config_cls = LLMInt8Config
    needs_calibration = False

    def collector(self, ctx, name, linear):
        return OutlierStats(self.cfg.threshold)

    def quantize_linear(self, ctx, name, linear, stats):
        seen = stats is not None and stats.col_hits is not None
        keep = None
        if seen and self.cfg.keep_outlier_weights:
            keep = stats.outlier_dims()[: int(self.cfg.max_kept_fraction * linear.in_features)]
        layer = MixedInt8Linear.from_linear(linear, threshold=self.cfg.threshold, fp_cols=keep)
        extra = {**stats.report(), "kept_columns": 0 if keep is None else int(keep.numel())} if seen else {}
        return Quantized(layer, extra)
