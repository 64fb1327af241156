"""What every quantized Linear shares: argument checks, the weight ranges check, the base class."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec


# ----------------------------------------------------------------------------- helpers

def _as_spec(spec) -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, dict):
        try:
            return QuantSpec(**spec)
        except TypeError as e:
            raise LowbitError(f"spec: {e}") from None
    raise LowbitError(f"spec must be a QuantSpec or a dict of its fields, got {type(spec).__name__}")


def _as_dtype(dtype) -> torch.dtype:
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise LowbitError(f"dtype must be a floating torch dtype (or its name), got {dtype!r}")
    return dt


def _grouped_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, int]:
    """(rows, G) of a weight's scale/zero: [out, ceil(in/g)], [out, 1] per channel, [1, 1] per tensor.

    A group size that does not divide in_features leaves a shorter last group, as in the GPTQ reference
    (column j is in group j // g): SmolLM2's 576-wide inputs with g=128 get four groups of 128 and one of 64.
    """
    gs = spec.group_size
    if gs > in_features:
        raise LowbitError(f"group_size={gs} is larger than in_features={in_features}")
    return (1 if gs == 0 else out_features), (-(-in_features // gs) if gs > 0 else 1)


def _ragged(spec: QuantSpec, in_features: int) -> bool:
    return spec.group_size > 0 and in_features % spec.group_size != 0


def _fit(t, shape, dtype, device, name: str) -> torch.Tensor:
    """t reshaped to `shape`, cast to dtype and moved to device, as an own contiguous copy."""
    t = torch.as_tensor(t).detach()
    if t.numel() != math.prod(shape):
        raise LowbitError(f"{name} has {t.numel()} values but the layer needs shape {tuple(shape)}")
    return t.reshape(shape).to(device=device, dtype=dtype, copy=True).contiguous()


def _linear_weight(linear: nn.Module) -> torch.Tensor:
    if not isinstance(getattr(linear, "weight", None), torch.Tensor) or linear.weight.ndim != 2:
        raise LowbitError(f"linear must be an nn.Linear-like module with a 2-d weight, got {type(linear).__name__}")
    return linear.weight.detach().float()  # quantization math runs in float32


def _weight_range(w: torch.Tensor, spec: QuantSpec, lo, hi):
    """Given ranges lo/hi ([rows, G] or [rows, G, 1]; None = per-group min/max) in the grouped layout
    [rows, G, 1] that primitives.quantize_weight takes, checked against w's shape (and spec's group size)."""
    rows, g = _grouped_shape(spec, *w.shape)
    lo = None if lo is None else _fit(lo, (rows, g, 1), torch.float32, w.device, "lo")
    hi = None if hi is None else _fit(hi, (rows, g, 1), torch.float32, w.device, "hi")
    return lo, hi


# Weight fake-quant modes other than a QuantSpec (integer grid): fp8 per tensor / per channel.
FP8_WEIGHT = {"fp8": False, "fp8_channel": True}


# ----------------------------------------------------------------------------- base

class _QuantLinear(nn.Module):
    kind = ""
    _keep_dtype: tuple[str, ...] = ()  # buffers whose dtype is part of the format

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LowbitError(f"{name} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self._dtype = _as_dtype(dtype)
        self.register_buffer("bias", torch.empty(out_features, dtype=self._dtype, device=device) if bias else None)

    def nbytes(self) -> int:
        """Bytes of everything stored: codes, scales, zeros, g_idx, bias."""
        ts = itertools.chain(self.buffers(recurse=False), self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in ts)

    def format_nbytes(self) -> int:
        """Bytes the weight format needs when packed (codes, scales, zeros, bias); equals nbytes() for the
        layers that hold their packed form, less for the simulation layer that holds a dequantized weight."""
        return self.nbytes()

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) cast every floating tensor, fp8 codes and fp32 scales too;
        # those buffers may only change device.
        kept = {n: self._buffers[n] for n in self._keep_dtype if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            if self._buffers[n].dtype != t.dtype:
                self._buffers[n] = t.to(self._buffers[n].device)
        return self

    def _load(self, name: str, value):
        """Set buffer `name` from value, fitted to the buffer's shape, dtype and device."""
        like = self._buffers[name]
        setattr(self, name, _fit(value, like.shape, like.dtype, like.device, name))

    def _load_optional(self, **values) -> None:
        """_load each given tensor (e.g. act_scale=..., bias=...), skipping the ones that are None."""
        for name, value in values.items():
            if value is not None:
                self._load(name, value)

    def check_loaded(self) -> None:
        """After a checkpoint's tensors are assigned (models.loader.build_model): every scale is positive
        (NaN/Inf are left to the loader's finite check, which warns or refuses). Subclasses add the checks of
        their own format. One vectorised pass per buffer: cheap next to reading the file."""
        for name in ("scale", "w_scale", "act_scale"):
            t = self._buffers.get(name)
            if t is not None and not t.is_meta and t.numel():
                n = int((t.float() <= 0).sum())
                if n:
                    raise LowbitError(f"{name} holds {n} value{'s' if n > 1 else ''} <= 0 (min {float(t.min()):g}); "
                                      f"scales must be positive")

    def _check_input(self, x: torch.Tensor):
        if x.shape[-1] != self.in_features:
            raise LowbitError(f"input has last dim {x.shape[-1]} but the layer has in_features={self.in_features}")

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """float32 y [M, out] + bias, in x's dtype and leading shape [..., out]."""
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _options(self) -> dict:
        return {}

    def layer_config(self) -> dict:
        """JSON-able description: build_layer(layer_config()) makes an empty twin of this layer."""
        # The storage dtype as it is now (.half() may have changed it since construction).
        dt = next((self._buffers[n].dtype for n in ("scale", "weight", "bias") if self._buffers.get(n) is not None),
                  self._dtype)
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": str(dt).removeprefix("torch."), **self._options()}

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self._options().items())
        return f"in_features={self.in_features}, out_features={self.out_features}{opts}, bias={self.bias is not None}"


