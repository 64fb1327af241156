"""Quantized drop-in replacements for nn.Linear (CPU reference paths; GPU kernels reuse the buffers).

  WeightOnlyLinear  WkA16: k-bit codes packed along the input dim + per-group scale/zero,
                    dequantized on the fly to the input's dtype.
  Int8Linear        W8A8 int8: per-output-channel symmetric weights, per-token dynamic (or
                    static per-tensor) symmetric activations, exact int32 accumulation.
  FP8Linear         W8A8 fp8 e4m3: per-channel or per-tensor weight scale, per-tensor activation
                    scale; torch._scaled_mm on CUDA sm >= 8.9, an fp32 emulation elsewhere.
  FakeQuantLinear   float weight quantize-dequantized once + optional activation fake-quant:
                    the reference each real layer is tested against.

Every class: Cls(in_features, out_features, <options>, bias=True, dtype=..., device=None)
allocates empty buffers (device="meta" works; then load_state_dict(sd, assign=True)).
state_dict() holds plain tensors only (safetensors-ready); nbytes() counts stored bytes;
layer_config() gives JSON-able constructor kwargs that build_layer() turns back into a layer.
All quantize/dequantize math is lowbit.quant.primitives'.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.quant.int8_matmul import (ACT_QUANT, FP8_FMT, INT8_SYM, fp8_scaled_mm, int8_mm, quantize_act_fp8,
                                      quantize_act_int8, scaled_mm_supported)
from lowbit.quant.observers import observe
from lowbit.quant.primitives import (QuantSpec, dequantize, dequantize_groups, fp8_dequantize, fp8_quantize,
                                     from_groups, group_minmax, pack, packed_numel, qparams, quantize,
                                     quantize_groups, to_groups, unpack)


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


def _parts(spec: QuantSpec, in_features: int) -> list[tuple[slice, QuantSpec]]:
    """Column slices and the spec each is quantized with: all columns, or (whole groups, the short last group)."""
    if not _ragged(spec, in_features):
        return [(slice(0, in_features), spec)]
    cut = in_features - in_features % spec.group_size
    tail = dataclasses.replace(spec, group_size=in_features % spec.group_size)
    return [(slice(0, cut), spec), (slice(cut, in_features), tail)]


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


def quantize_weight(w: torch.Tensor, spec: QuantSpec, lo=None, hi=None,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes [out, in], scale [rows, G, 1], zero [rows, G, 1]).

    Like primitives.quantize_groups, except that scale/zero are first rounded to
    scale_dtype (the dtype they are stored in), so the codes are the nearest ones for
    the stored scales and dequantization from storage reproduces them exactly.
    """
    if scale_dtype is None:
        return quantize_groups(w, spec, lo, hi)
    wg = to_groups(w, spec.group_size)  # [out, G, g]
    if lo is None or hi is None:
        glo, ghi = group_minmax(w, spec.group_size)  # [rows, G, 1]
        lo, hi = glo if lo is None else lo, ghi if hi is None else hi
    scale, zero = qparams(lo, hi, spec)  # [rows, G, 1]
    # A scale below the storage dtype's smallest normal would flush to 0 and divide by zero.
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).to(scale.dtype)
    zero = zero.to(scale_dtype).to(zero.dtype)
    q = quantize(wg, scale, zero, spec)  # [out, G, g]
    return from_groups(q, w.shape), scale, zero


def _weight_range(w: torch.Tensor, spec: QuantSpec, lo, hi, observer):
    """(lo, hi) in the grouped layout [rows, G, 1] (None = per-group min/max), from lo/hi or an observer."""
    if observer is not None:
        if lo is not None or hi is not None:
            raise LowbitError("pass either lo/hi or observer, not both")
        if not (isinstance(observer, str) or callable(observer)):
            raise LowbitError(f"observer must be a name or an Observer, got {type(observer).__name__}")
        lo, hi = observe(w, spec, method=observer) if isinstance(observer, str) else observer(w)
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


# ----------------------------------------------------------------------------- weight-only

class WeightOnlyLinear(_QuantLinear):
    """WkA16 linear. Buffers: qweight uint8 [out, packed_numel(in, bits)] (primitives.pack),
    scale [rows, G] and zero [rows, G] (asymmetric only; the real offset for float zero points)
    in dtype, g_idx int32 [in] when act_order (column j uses group g_idx[j]), bias [out]."""

    kind = "weight_only"

    def __init__(self, in_features: int, out_features: int, spec, bias: bool = True,
                 dtype=torch.float16, act_order: bool = False, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.spec = _as_spec(spec)
        self.act_order = bool(act_order)
        rows, g = _grouped_shape(self.spec, out_features, in_features)
        kw = dict(dtype=self._dtype, device=device)
        self.register_buffer("qweight", torch.empty(out_features, packed_numel(in_features, self.spec.bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(rows, g, **kw))
        # Symmetric grids have zero == 0 by definition: store nothing.
        self.register_buffer("zero", None if self.spec.symmetric else torch.empty(rows, g, **kw))
        # g_idx: the group of each input column, for act-order and for a short last group.
        has_gidx = act_order or _ragged(self.spec, in_features)
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device) if has_gidx else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec, lo=None, hi=None, observer=None,
                    dtype=torch.float16) -> "WeightOnlyLinear":
        """Quantize linear's weight with spec; range per group from lo/hi ([rows, G] or [rows, G, 1],
        e.g. clipped by AWQ/GPTQ), an observer (name or Observer) or min/max. dtype: scale/zero/bias storage."""
        spec, dtype = _as_spec(spec), _as_dtype(dtype)
        w = _linear_weight(linear)  # [out, in]
        _grouped_shape(spec, *w.shape)  # group_size check before any work
        codes, scales, zeros, g0 = [], [], [], 0
        for cols, sub in _parts(spec, w.shape[1]):  # one part, or whole groups + the short last group
            wp = w[:, cols]                                                     # [out, cols]
            n_groups = _grouped_shape(sub, *wp.shape)[1]
            part = slice(g0, g0 + n_groups)
            lo_p, hi_p = _weight_range(wp, sub, None if lo is None else torch.as_tensor(lo)[:, part],
                                       None if hi is None else torch.as_tensor(hi)[:, part], observer)
            q, scale, zero = quantize_weight(wp, sub, lo_p, hi_p, scale_dtype=dtype)  # scale [rows, G_p, 1]
            codes.append(q), scales.append(scale), zeros.append(zero)
            g0 += n_groups
        q, scale, zero = torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1)
        g_idx = torch.arange(w.shape[1]) // spec.group_size if _ragged(spec, w.shape[1]) else None
        return cls.from_quantized(q, scale, None if spec.symmetric else zero, spec, linear.bias, g_idx=g_idx,
                                  dtype=dtype)

    @classmethod
    def from_quantized(cls, q_codes: torch.Tensor, scale, zero, spec, bias=None, g_idx=None,
                       dtype=torch.float16) -> "WeightOnlyLinear":
        """Build from codes computed elsewhere (GPTQ): q_codes [out, in] on spec's grid, scale/zero
        [rows, G] (or [rows, G, 1]), g_idx [in] or None. scale/zero are cast to dtype, so compute
        codes against dtype-rounded scales for exact agreement."""
        spec = _as_spec(spec)
        if not isinstance(q_codes, torch.Tensor) or q_codes.ndim != 2 or q_codes.is_floating_point():
            raise LowbitError("q_codes must be a 2-d integer tensor [out_features, in_features]")
        out_f, in_f = q_codes.shape
        layer = cls(in_f, out_f, spec, bias=bias is not None, dtype=dtype,
                    act_order=g_idx is not None and not _ragged(spec, in_f), device=q_codes.device)
        if q_codes.numel() and (int(q_codes.min()) < spec.qmin or int(q_codes.max()) > spec.qmax):
            raise LowbitError(f"q_codes must lie in [{spec.qmin}, {spec.qmax}] for {spec.tag}, "
                              f"got [{int(q_codes.min())}, {int(q_codes.max())}]")
        layer.qweight = pack(q_codes, spec.bits)
        layer._load("scale", scale)
        if spec.symmetric:
            if zero is not None and bool(torch.as_tensor(zero).ne(0).any()):
                raise LowbitError("zero must be None or all 0 for a symmetric spec")
        elif zero is None:
            raise LowbitError(f"zero is required for the asymmetric spec {spec.tag}")
        else:
            layer._load("zero", zero)
        if g_idx is not None:
            layer._load("g_idx", g_idx)
            gi = layer.g_idx
            if int(gi.min()) < 0 or int(gi.max()) >= layer.scale.shape[1]:
                raise LowbitError(f"g_idx values must lie in [0, {layer.scale.shape[1]}), "
                                  f"got [{int(gi.min())}, {int(gi.max())}]")
        if bias is not None:
            layer._load("bias", bias)
        return layer

    def codes(self) -> torch.Tensor:
        """Unpacked codes [out, in] (int8 symmetric, uint8 otherwise)."""
        return unpack(self.qweight, self.spec.bits, self.in_features, signed=self.spec.symmetric)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in], computed in float32 (float64 if stored so), cast to dtype if given."""
        work = torch.promote_types(self.scale.dtype, torch.float32)
        q, s = self.codes(), self.scale.to(work)  # [out, in], [rows, G]
        z = None if self.zero is None else self.zero.to(work)  # [rows, G]
        if self.g_idx is None:  # contiguous groups: scale/zero viewed as [rows, G, 1]
            w = dequantize_groups(q, s.unsqueeze(-1), 0 if z is None else z.unsqueeze(-1), self.spec)  # [out, in]
        else:  # act order: column j takes group g_idx[j]'s scale/zero, gathered to [rows, in]
            gi = self.g_idx.long()
            w = dequantize(q, s[:, gi], 0 if z is None else z[:, gi], self.spec)  # [out, in]
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def _options(self):
        return {"spec": dataclasses.asdict(self.spec), "act_order": self.act_order}

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.tag}, "
                f"act_order={self.act_order}, bias={self.bias is not None}, dtype={self.scale.dtype}")


# ----------------------------------------------------------------------------- W8A8

class Int8Linear(_QuantLinear):
    """W8A8 int8 linear. Buffers: qweight int8 [out, in], w_scale float32 [out, 1], act_scale
    float32 [1] when static_act (else per-token dynamic), bias [out]. Output in the input's dtype."""

    kind = "int8"
    _keep_dtype = ("w_scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, static_act: bool = False, bias: bool = True,
                 dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.static_act = bool(static_act)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, act_scale=None, dtype=None) -> "Int8Linear":
        """act_scale: static activation step (calibrated absmax / 127), or None for per-token dynamic.
        dtype: bias storage (default: linear's dtype)."""
        w = _linear_weight(linear)  # [out, in]
        q, s, _ = quantize_groups(w, INT8_SYM)  # q [out, in], s [out, 1, 1]
        layer = cls(w.shape[1], w.shape[0], static_act=act_scale is not None, bias=linear.bias is not None,
                    dtype=dtype or linear.weight.dtype, device=w.device)
        layer.qweight = q
        layer._load("w_scale", s)
        if act_scale is not None:
            layer._load("act_scale", act_scale)
        if linear.bias is not None:
            layer._load("bias", linear.bias)
        return layer

    def int_accumulate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., in] -> (exact int32 sums [M, out], activation scale [M, 1] or [1, 1])."""
        qx, sx = quantize_act_int8(x.reshape(-1, self.in_features), self.act_scale)  # [M, in] int8
        return int8_mm(qx, self.qweight), sx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        acc, sx = self.int_accumulate(x)  # [M, out]
        y = acc.float() * sx.float() * self.w_scale.reshape(1, -1)  # [M, out]: act_scale (x) w_scale
        return self._finish(y, x)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in]: int8 codes times the per-channel scale."""
        w = self.qweight.float() * self.w_scale                                  # [out, in] * [out, 1]
        return w if dtype is None else w.to(dtype)

    def _options(self):
        return {"static_act": self.static_act}


class FP8Linear(_QuantLinear):
    """W8A8 fp8 (e4m3) linear. Buffers: qweight float8_e4m3fn [out, in], w_scale float32 [out, 1]
    (per_channel) or [1, 1], act_scale float32 [1] when static_act (else per-tensor dynamic), bias."""

    kind = "fp8"
    _keep_dtype = ("qweight", "w_scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, per_channel: bool = True, static_act: bool = False,
                 bias: bool = True, dtype=torch.float16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.per_channel, self.static_act = bool(per_channel), bool(static_act)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                    device=device))
        self.register_buffer("w_scale", torch.empty(out_features if per_channel else 1, 1,
                                                    dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, per_channel: bool = True, act_scale=None, dtype=None) -> "FP8Linear":
        """act_scale: static activation scale (calibrated absmax / 448), or None for per-tensor dynamic."""
        w = _linear_weight(linear)  # [out, in]
        layer = cls(w.shape[1], w.shape[0], per_channel=per_channel, static_act=act_scale is not None,
                    bias=linear.bias is not None, dtype=dtype or linear.weight.dtype, device=w.device)
        layer.qweight, layer.w_scale = fp8_quantize(w, FP8_FMT, per_channel=per_channel)  # [out, in], [out|1, 1]
        if act_scale is not None:
            layer._load("act_scale", act_scale)
        if linear.bias is not None:
            layer._load("bias", linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        qx, sx = quantize_act_fp8(x.reshape(-1, self.in_features), self.act_scale)  # [M, in] fp8, [1, 1]
        if scaled_mm_supported(qx, self.qweight):
            y = fp8_scaled_mm(qx, sx, self.qweight, self.w_scale)  # [M, out] float32
        else:  # emulation: what _scaled_mm computes, up to accumulation order
            y = fp8_dequantize(qx, sx) @ fp8_dequantize(self.qweight, self.w_scale).t()  # [M, out]
        return self._finish(y, x)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Real weight [out, in]: fp8 codes times their scales."""
        w = fp8_dequantize(self.qweight, self.w_scale, torch.float32)
        return w if dtype is None else w.to(dtype)

    def _options(self):
        return {"per_channel": self.per_channel, "static_act": self.static_act}


# ----------------------------------------------------------------------------- fake quant

class FakeQuantLinear(_QuantLinear):
    """Simulation/reference: weight [out, in] (already quantize-dequantized) in dtype, bias, and
    optional activation fake-quant act in ACT_QUANT ("int8" per-token, "fp8" per-tensor), with a
    static act_scale [1] when static_act. spec (QuantSpec, its dict, "fp8", "fp8_channel" or None)
    records how the weight was quantized."""

    kind = "fake"

    def __init__(self, in_features: int, out_features: int, spec=None, act: str | None = None,
                 static_act: bool = False, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if act is not None and act not in ACT_QUANT:
            raise LowbitError(f"act must be None or one of {sorted(ACT_QUANT)}, got {act!r}")
        if static_act and act is None:
            raise LowbitError("static_act needs an activation format (act='int8' or 'fp8')")
        if isinstance(spec, str) and spec not in FP8_WEIGHT:
            raise LowbitError(f"spec must be a QuantSpec, None or one of {sorted(FP8_WEIGHT)}, got {spec!r}")
        self.spec = spec if spec is None or isinstance(spec, str) else _as_spec(spec)
        if isinstance(self.spec, QuantSpec):
            _grouped_shape(self.spec, out_features, in_features)
        self.act, self.static_act = act, bool(static_act)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self._dtype, device=device))
        self.register_buffer("act_scale", torch.empty(1, dtype=torch.float32, device=device) if static_act else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec=None, act: str | None = None, act_scale=None, lo=None, hi=None,
                    observer=None, scale_dtype: torch.dtype | None = None, dtype=torch.float32) -> "FakeQuantLinear":
        """Weight -> primitives.fake_quantize(spec) (scale/zero first rounded to scale_dtype if given,
        as WeightOnlyLinear stores them), or fp8 e4m3 for spec "fp8"/"fp8_channel", or kept for None."""
        w = _linear_weight(linear)  # [out, in]
        layer = cls(w.shape[1], w.shape[0], spec, act=act, static_act=act_scale is not None,
                    bias=linear.bias is not None, dtype=dtype, device=w.device)
        if isinstance(layer.spec, QuantSpec):
            lo, hi = _weight_range(w, layer.spec, lo, hi, observer)
            q, scale, zero = quantize_weight(w, layer.spec, lo, hi, scale_dtype)
            w = dequantize_groups(q, scale, zero, layer.spec)  # [out, in]
        elif layer.spec is not None:
            w = fp8_dequantize(*fp8_quantize(w, FP8_FMT, per_channel=FP8_WEIGHT[layer.spec]))
        layer._load("weight", w)
        if act_scale is not None:
            layer._load("act_scale", act_scale)
        if linear.bias is not None:
            layer._load("bias", linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.act is not None:
            quant, dequant = ACT_QUANT[self.act]
            xq = dequant(*quant(x.reshape(-1, self.in_features), self.act_scale))  # [M, in] float32
            x = xq.to(x.dtype).reshape(x.shape)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer multiplies by [out, in] (float32 unless dtype)."""
        return self.weight.float() if dtype is None else self.weight.to(dtype)

    def _options(self):
        spec = dataclasses.asdict(self.spec) if isinstance(self.spec, QuantSpec) else self.spec
        return {"spec": spec, "act": self.act, "static_act": self.static_act}

    def extra_repr(self):
        tag = self.spec.tag if isinstance(self.spec, QuantSpec) else self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={tag}, "
                f"act={self.act}, static_act={self.static_act}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- registry

LAYER_CLASSES: dict[str, type[_QuantLinear]] = {
    "weight_only": WeightOnlyLinear,
    "int8": Int8Linear,
    "fp8": FP8Linear,
    "fake": FakeQuantLinear,
}
from lowbit.quant import mixed_int8 as _mixed_int8  # noqa: E402,F401  LLM.int8(): registers "llm_int8" here


def build_layer(config: dict, device=None) -> _QuantLinear:
    """Empty layer from a layer_config() dict (e.g. read from a checkpoint's JSON); load weights next."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in LAYER_CLASSES:
        raise LowbitError(f"config kind must be one of {sorted(LAYER_CLASSES)}, got {kind!r}")
    try:
        return LAYER_CLASSES[kind](**cfg, device=device)
    except TypeError as e:  # unknown or missing option for this class
        raise LowbitError(f"config for {kind!r}: {e}") from None


def swap_linear(module: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` (e.g. "model.layers.0.self_attn.q_proj") by new; returns the old one."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = module.get_submodule(parent_name)
    except AttributeError:
        raise LowbitError(f"name {name!r}: no submodule {parent_name!r} in {type(module).__name__}") from None
    if leaf not in parent._modules:
        raise LowbitError(f"name {name!r}: {type(parent).__name__} has no child module {leaf!r}")
    old = parent._modules[leaf]
    setattr(parent, leaf, new)
    return old
