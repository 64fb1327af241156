"""WkA16: k-bit codes packed along the input dim, per-group scale/zero, dequantized on the fly."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels import use_cpu_kernels, use_kernels
from lowbit.kernels.cpu_wq import cpu_linear, cpu_pack, current_backend
from lowbit.kernels.primitives import (dequantize, dequantize_groups, pack, packed_numel, quantize_weight,
                                       unpack)


from lowbit.layers.base import (_QuantLinear, _as_dtype, _as_spec, _grouped_shape, _linear_weight,
                                       _ragged, _weight_range)


# ----------------------------------------------------------------------------- weight-only


def _buffers_key(layer) -> tuple:
    """Identity and version of the buffers a packed copy is derived from: changes on assignment, .to()
    and in-place writes (load_state_dict copies in place)."""
    key = []
    for name in ("qweight", "scale", "zero", "g_idx"):
        t = layer._buffers.get(name)
        if t is not None:
            try:
                version = t._version
            except RuntimeError:  # inference tensors have no version counter
                version = -1
            key.append((t.data_ptr(), t.device, t.dtype, version))
    return tuple(key)


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
    def from_linear(cls, linear: nn.Module, spec, lo=None, hi=None, dtype=torch.float16) -> "WeightOnlyLinear":
        """Quantize linear's weight with spec; range per group from lo/hi ([rows, G] or [rows, G, 1], e.g.
        clipped by AWQ or a method's observer) or min/max; codes against the scales as stored in dtype
        (scale/zero/bias storage)."""
        spec, dtype = _as_spec(spec), _as_dtype(dtype)
        w = _linear_weight(linear)  # [out, in]
        lo, hi = _weight_range(w, spec, lo, hi)  # group_size check before any work
        q, scale, zero = quantize_weight(w, spec, lo, hi, scale_dtype=dtype)  # scale [rows, G, 1]
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

    def check_loaded(self) -> None:
        """Loaded tensors agree with the spec: g_idx names existing groups; an integer zero point holds integers
        on the code grid (a float zero point may be any real offset)."""
        super().check_loaded()
        groups = self.scale.shape[1]
        if self.g_idx is not None and self.g_idx.numel():
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= groups:
                raise LowbitError(f"g_idx values must lie in [0, {groups}), got [{lo}, {hi}]")
        if self.zero is not None and not self.spec.float_zero:
            z = self.zero.float()
            z = z[torch.isfinite(z)]
            if z.numel() and bool(((z != z.round()) | (z < self.spec.qmin) | (z > self.spec.qmax)).any()):
                raise LowbitError(f"zero must hold integers in [{self.spec.qmin}, {self.spec.qmax}] for "
                                  f"{self.spec.tag} (an integer zero point), got values in "
                                  f"[{float(z.min()):g}, {float(z.max()):g}]")

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
        if use_kernels(x) and x.dtype in (torch.float16, torch.bfloat16):
            packed = self.kernel_weight()
            if packed is not None:
                from lowbit.kernels.wq_gemm import wq_linear
                return wq_linear(x, packed, self.bias)
        if use_cpu_kernels(x):
            packed = self.cpu_weight()
            # PyTorch's fp32 kernels are matrix-vector speed: decode-sized inputs only (cpu_wq.CpuPacked.max_rows)
            if packed is not None and x.numel() <= packed.max_rows * self.in_features:
                return cpu_linear(x, packed, self.out_features, self.bias)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def cpu_weight(self):
        """The weight in a CPU kernel's layout (lowbit.kernels.cpu_wq.CpuPacked), built on first use and
        rebuilt when a buffer is replaced or written in place; None if no CPU kernel takes this grid."""
        key = (_buffers_key(self), current_backend())
        if getattr(self, "_cpu_key", None) != key:
            self._cpu_packed, self._cpu_key = cpu_pack(self), key
        return self._cpu_packed

    def kernel_weight(self):
        """The weight in the Triton kernel's layout (lowbit.kernels.wq_gemm.PackedWeight), built on first
        use and rebuilt when the codes change (a load_state_dict, a .to()); None if the kernel cannot
        take this layer (3-bit, irregular groups). Not a buffer: checkpoints keep the portable layout."""
        key = (self.qweight.data_ptr(), self.scale.data_ptr(), self.qweight.device)
        if getattr(self, "_packed_key", None) != key:
            from lowbit.kernels.wq_gemm import repack
            self._packed, self._packed_key = repack(self), key
        return self._packed

    def _options(self):
        return {"spec": dataclasses.asdict(self.spec), "act_order": self.act_order}

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.tag}, "
                f"act_order={self.act_order}, bias={self.bias is not None}, dtype={self.scale.dtype}")


