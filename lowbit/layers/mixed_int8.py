"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 matmul with a mixed-precision outlier decomposition.

For an input X [M, in] (M tokens) and a weight W [out, in]:

    O     = { j : |X[i, j]| >= threshold for some row i of this batch }     (outlier feature dims, per call)
    X W^T = X[:, O] W[:, O]^T            in float (16/32-bit)
          + X[:, ~O] W[:, ~O]^T          int8 x int8 -> exact int32 sums, per-token x per-channel scales

The int8 part is "vector-wise": each row of X[:, ~O] has its own absmax scale (the outlier dims are zeroed
first, so one large feature no longer inflates every token's scale, which is the point of the method), each
output channel of W its own absmax scale. Outlier dims are found at run time from the current batch, as the
reference does; calibration is only used for the report and for which weight columns to keep (below).

Weight storage (the choice the paper leaves open; see `MixedInt8Linear`): W is stored once, as int8 codes with
one float32 scale per output channel (bitsandbytes' CB/SCB). The float path multiplies by the int8-dequantized
columns qweight[:, O] * w_scale, as bitsandbytes does in inference mode (has_fp16_weights=False). The
columns of the feature dims that calibration saw as outliers can in addition be stored as the ORIGINAL
weight columns (`fp_cols`/`fp_weight`, in the model dtype): LLM.int8()'s outliers are systematic (the same
few feature dims in every token), so those few columns are the ones the float path uses almost always, and
they then see the unquantized weight, as in the paper's fp16 formulation, for a few extra bytes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.int8_matmul import INT8_SYM, int8_mm, quantize_act_int8
from lowbit.layers.base import _linear_weight, _QuantLinear
from lowbit.kernels.primitives import dequantize, quantize_groups

DEFAULT_THRESHOLD = 6.0


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise LowbitError(f"threshold must be a finite number >= 0 (0 turns the decomposition off), got {threshold!r}")
    return float(threshold)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Input feature dims (int64 [k], ascending) where any row of x [M, in] has |x| >= threshold (0: none)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return (x.abs() >= threshold).any(dim=0).nonzero().flatten()


class MixedInt8Linear(_QuantLinear):
    """LLM.int8() linear. Buffers: qweight int8 [out, in] and w_scale float32 [out, 1] (per-output-channel
    absmax / 127), fp_cols int32 [k] (ascending input dims) and fp_weight [out, k] in dtype (their original
    weight columns) when n_fp_cols = k > 0, bias [out]. threshold: the outlier magnitude (0 = plain
    vector-wise int8, no decomposition). Output in the input's dtype."""

    kind = "llm_int8"
    _keep_dtype = ("w_scale",)

    def __init__(self, in_features: int, out_features: int, threshold: float = DEFAULT_THRESHOLD,
                 n_fp_cols: int = 0, bias: bool = True, dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.threshold = _check_threshold(threshold)
        if isinstance(n_fp_cols, bool) or not isinstance(n_fp_cols, int) or not 0 <= n_fp_cols <= in_features:
            raise LowbitError(f"n_fp_cols must be an integer in [0, in_features={in_features}], got {n_fp_cols!r}")
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        k = n_fp_cols
        self.register_buffer("fp_cols", torch.empty(k, dtype=torch.int32, device=device) if k else None)
        self.register_buffer("fp_weight", torch.empty(out_features, k, dtype=self._dtype, device=device) if k else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = DEFAULT_THRESHOLD, fp_cols=None,
                    dtype=None) -> "MixedInt8Linear":
        """Quantize linear's weight per output channel; fp_cols: input dims whose original weight columns are
        kept (e.g. those calibration saw as outliers), or None. dtype: bias / kept-column storage
        (default: linear's dtype)."""
        w = _linear_weight(linear)                                              # [out, in] float32
        out_f, in_f = w.shape
        cols = torch.empty(0, dtype=torch.long) if fp_cols is None else torch.as_tensor(fp_cols).long().flatten()
        cols = torch.unique(cols.cpu())                                         # sorted, no repeats
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_f):
            raise LowbitError(f"fp_cols must lie in [0, {in_f}), got [{int(cols.min())}, {int(cols.max())}]")
        layer = cls(in_f, out_f, threshold=threshold, n_fp_cols=cols.numel(), bias=linear.bias is not None,
                    dtype=dtype or linear.weight.dtype, device=w.device)
        q, s, _ = quantize_groups(w, INT8_SYM)                                  # q [out, in], s [out, 1, 1]
        layer.qweight = q
        layer._load("w_scale", s)
        if cols.numel():
            layer._load("fp_cols", cols)
            layer._load("fp_weight", linear.weight.detach()[:, cols.to(w.device)])  # exact original columns
        if linear.bias is not None:
            layer._load("bias", linear.bias)
        return layer

    # ------------------------------------------------------------------ the two halves

    def outlier_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Outlier input dims (int64 [k]) of x [..., in] for this call."""
        return outlier_columns(x.reshape(-1, self.in_features), self.threshold)

    def int_accumulate(self, x: torch.Tensor, cols: torch.Tensor | None = None):
        """The int8 half. x [..., in] -> (exact int32 sums [M, out] over the non-outlier dims, per-token
        scale [M, 1], outlier dims [k]). cols: outlier dims to use (default: found in x)."""
        x2 = x.reshape(-1, self.in_features)                                    # [M, in]
        if cols is None:
            cols = outlier_columns(x2, self.threshold)
        if cols.numel():
            x2 = x2.index_fill(1, cols, 0)                                      # outlier dims go the float way
        qx, sx = quantize_act_int8(x2, None)                                    # [M, in] int8, [M, 1]
        return int8_mm(qx, self.qweight), sx, cols

    def outlier_weight(self, cols: torch.Tensor) -> torch.Tensor:
        """The weight columns W[:, cols] the float half uses, float32 [out, k]: the kept original columns
        where cols are in fp_cols, else the int8 columns dequantized (bitsandbytes' CB * SCB / 127)."""
        w = dequantize(self.qweight[:, cols], self.w_scale, 0, INT8_SYM)        # [out, k]
        if self.fp_cols is not None and cols.numel():
            pos = torch.full((self.in_features,), -1, dtype=torch.long, device=cols.device)
            pos[self.fp_cols.long()] = torch.arange(self.fp_cols.numel(), device=cols.device)
            p = pos[cols]                                                       # [k]: index into fp_cols or -1
            kept = p >= 0
            w[:, kept] = self.fp_weight[:, p[kept]].float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        acc, sx, cols = self.int_accumulate(x)                                  # [M, out]
        y = acc.float() * sx.float() * self.w_scale.reshape(1, -1)              # [M, out]
        if cols.numel():                                                        # float half: X[:, O] W[:, O]^T
            xo = x.reshape(-1, self.in_features)[:, cols].float()               # [M, k]
            y = y + F.linear(xo, self.outlier_weight(cols))
        return self._finish(y, x)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in]: int8 codes times the per-channel scale, with the kept original columns
        (the weight the float half multiplies outlier dims by; the int8 half never sees those dims then)."""
        w = self.outlier_weight(torch.arange(self.in_features, device=self.qweight.device))
        return w if dtype is None else w.to(dtype)

    def check_loaded(self) -> None:
        """Loaded tensors agree with the layer: fp_cols are distinct input dims, ascending."""
        super().check_loaded()
        c = self.fp_cols
        if c is not None and c.numel():
            if int(c.min()) < 0 or int(c.max()) >= self.in_features:
                raise LowbitError(f"fp_cols must lie in [0, {self.in_features}), got [{int(c.min())}, {int(c.max())}]")
            if c.numel() > 1 and not bool((c[1:] > c[:-1]).all()):
                raise LowbitError("fp_cols must be ascending input dims without repeats")

    def _options(self):
        return {"threshold": self.threshold, "n_fp_cols": 0 if self.fp_cols is None else self.fp_cols.numel()}

    def layer_config(self) -> dict:
        cfg = super().layer_config()
        if self.fp_weight is not None:  # the storage dtype of the kept columns (.half() may have changed it)
            cfg["dtype"] = str(self.fp_weight.dtype).removeprefix("torch.")
        return cfg
