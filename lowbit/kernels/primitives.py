"""Pure quantization primitives: the one quantize/dequantize everything else calls.

Integer grids (QuantSpec.bits in 2..8):
  symmetric        q in [-2^(b-1), 2^(b-1)-1], scale = absmax / (2^(b-1)-1), zero = 0
                   real = scale * q. absmax itself is exactly on the grid; the extra
                   negative code -2^(b-1) is only reached by values outside a clipped range.
  asymmetric, int  q in [0, 2^b-1], range widened to contain 0, scale = (max-min) / (2^b-1),
                   zero = round(-min/scale) (an integer), real = scale * (q - zero).
                   0.0 is exactly representable (zero padding / ReLU zeros stay exact).
  asymmetric, float  q in [0, 2^b-1], scale = (max-min) / (2^b-1), zero = min (a real
                   offset, GGUF Q4_1 style), real = scale * q + zero.
Rounding is torch.round: round-half-to-even. Codes are int8 (symmetric) or uint8.

Granularity: every tensor is viewed as groups along its last (input) dim,
x [..., d] -> [..., G, g], and one scale/zero covers one group:
  group_size > 0   G = d/g groups of g           scale [..., d/g, 1]
  group_size = -1  one group per row (channel)   scale [..., 1, 1]
  group_size = 0   the whole tensor              scale [1, ..., 1] (ndim + 1 ones)
quantize/dequantize themselves are elementwise with broadcasting, so callers with other
layouts (KV cache per head, per-token activations) can pass their own scale shapes.
Weights [out, in]: quantize_weight / fake_quantize_weight also take a group size that does not
divide `in` (a short last group) and scales rounded to their storage dtype; every layer and method
quantizes weights through them.

All functions are pure (no in-place writes to inputs) and torch-only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError

ZERO_POINTS = ("int", "float")
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. zero_point only matters when symmetric is False."""

    bits: int = 4
    symmetric: bool = False
    group_size: int = 128  # >0: group along the last dim; -1: per-channel (row); 0: per-tensor
    zero_point: str = "int"  # "int": integer zero point; "float": real offset (GGUF Q4_1 style)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"symmetric must be True or False, got {self.symmetric!r}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < -1:
            raise LowbitError(
                f"group_size must be -1 (per-channel), 0 (per-tensor) or a positive group length, got {gs!r}")
        if self.zero_point not in ZERO_POINTS:
            raise LowbitError(f"zero_point must be one of {ZERO_POINTS}, got {self.zero_point!r}")

    @property
    def float_zero(self) -> bool:
        """True when zero is a real-valued offset (real = scale*q + zero)."""
        return not self.symmetric and self.zero_point == "float"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """Storage dtype of unpacked codes: signed grids are int8, unsigned uint8."""
        return torch.int8 if self.symmetric else torch.uint8

    @property
    def tag(self) -> str:
        """Short human-readable name, e.g. 'int4-asym-g128', 'int8-sym-ch', 'int4-fzp-g32'."""
        kind = "sym" if self.symmetric else ("fzp" if self.zero_point == "float" else "asym")
        gran = {-1: "ch", 0: "pt"}.get(self.group_size, f"g{self.group_size}")
        return f"int{self.bits}-{kind}-{gran}"


# ----------------------------------------------------------------------------- grouping

def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View x [..., d] as groups [..., G, g] (see module docstring for G, g)."""
    if x.ndim == 0:
        raise LowbitError("cannot quantize a 0-d tensor by groups; pass a tensor with at least one dim")
    d = x.shape[-1]
    if group_size > 0:
        if d % group_size:
            raise LowbitError(f"group_size={group_size} does not divide the last dimension ({d})")
        return x.reshape(*x.shape[:-1], d // group_size, group_size)  # [..., d/g, g]
    if group_size in (-1, 0):
        return x.unsqueeze(-2)  # [..., 1, d]: per-tensor reduces over all dims instead of the last
    raise LowbitError(f"group_size must be -1, 0 or positive, got {group_size}")


def from_groups(xg: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Inverse of to_groups: [..., G, g] -> shape ([..., d])."""
    return xg.reshape(shape)


def group_dims(xg: torch.Tensor, group_size: int) -> tuple[int, ...]:
    """Dims of the grouped view that one scale covers: the group, or everything per-tensor."""
    return tuple(range(xg.ndim)) if group_size == 0 else (-1,)


def group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of x [..., d], keepdim in the grouped layout ([..., G, 1])."""
    xg = to_groups(x, group_size)  # [..., G, g]
    dims = group_dims(xg, group_size)
    return xg.amin(dim=dims, keepdim=True), xg.amax(dim=dims, keepdim=True)


# ----------------------------------------------------------------------------- integer grids

def _work_dtype(*ts: torch.Tensor) -> torch.dtype:
    # Scales are computed in float32 even for fp16/bf16 inputs (bf16 scales lose ~3
    # significant digits); float64 inputs stay float64 so tests can check exactness.
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from per-group ranges lo <= hi (any broadcastable shapes, e.g. [..., G, 1]).

    zero is 0 (symmetric), an integer-valued float (asymmetric int) or the real offset
    `lo` (float zero point). A group whose range is empty (all zeros, or a constant
    with a float offset) gets scale 1 so that nothing divides by zero; its values
    still round-trip exactly.
    """
    dt = _work_dtype(lo, hi)
    lo, hi = lo.to(dt), hi.to(dt)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    if spec.zero_point == "float":
        scale = (hi - lo) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, lo.expand_as(scale).clone()
    # Integer zero point: widen to include 0, so that round(-lo/scale) lands inside
    # [0, qmax] and 0.0 maps exactly to the code `zero`.
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest(-even) integer codes, clamped to the grid. scale/zero broadcast to x."""
    if spec.float_zero:
        q = torch.round((x - zero) / scale)
    else:
        q = torch.round(x / scale) + zero  # zero is integral, so this equals round(x/scale + zero)
    return q.clamp(spec.qmin, spec.qmax).to(spec.code_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero, spec: QuantSpec,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Codes back to reals, computed in scale's dtype; optionally cast to dtype."""
    qf = q.to(scale.dtype)
    x = qf * scale + zero if spec.float_zero else (qf - zero) * scale
    return x if dtype is None else x.to(dtype)


def round_qparams(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scale/zero rounded to the dtype they are stored in (and kept in their own dtype), so that codes chosen
    against them are the nearest ones for the stored scales and dequantizing from storage reproduces them."""
    # A scale below the storage dtype's smallest normal would flush to 0 and divide by zero.
    scale = scale.clamp(min=torch.finfo(dtype).tiny).to(dtype).to(scale.dtype)
    return scale, zero.to(dtype).to(zero.dtype)


def quantize_groups(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
                    hi: torch.Tensor | None = None,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [..., d] by spec's groups -> (q [..., d], scale [..., G, 1], zero [..., G, 1]).

    lo/hi (grouped shape, e.g. from an observer) override the per-group min/max; values
    outside them are clipped. scale_dtype: scale/zero are first rounded to it (round_qparams).
    """
    xg = to_groups(x, spec.group_size)  # [..., G, g]
    if lo is None or hi is None:
        dims = group_dims(xg, spec.group_size)
        lo = xg.amin(dim=dims, keepdim=True) if lo is None else lo  # [..., G, 1]
        hi = xg.amax(dim=dims, keepdim=True) if hi is None else hi  # [..., G, 1]
    scale, zero = qparams(lo, hi, spec)
    if scale_dtype is not None:
        scale, zero = round_qparams(scale, zero, scale_dtype)
    q = quantize(xg, scale, zero, spec)  # [..., G, g]
    return from_groups(q, x.shape), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_groups: q [..., d] with grouped scale/zero -> reals [..., d]."""
    qg = to_groups(q, spec.group_size)  # [..., G, g]
    return from_groups(dequantize(qg, scale, zero, spec, dtype), q.shape)  # [..., d]


def fake_quantize(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
                  hi: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """quantize -> dequantize in x's shape and dtype (range: per-group min/max unless lo/hi given)."""
    q, scale, zero = quantize_groups(x, spec, lo, hi, scale_dtype)
    return dequantize_groups(q, scale, zero, spec, dtype=x.dtype)


# ----------------------------------------------------------------------------- weights [out, in]

def weight_parts(spec: QuantSpec, n: int) -> list[tuple[slice, QuantSpec, slice]]:
    """(columns, their spec, their groups on the scale's G axis) covering a weight's n input columns: all of
    them, or the whole groups and then the short last group a group size not dividing n leaves (column j is
    in group j // g, as in the GPTQ reference: SmolLM2's 576 inputs with g=128 are 4 x 128 + 64)."""
    g = spec.group_size
    if g <= 0 or n % g == 0:
        return [(slice(0, n), spec, slice(0, n // g if g > 0 else 1))]
    cut = n - n % g
    head = [(slice(0, cut), spec, slice(0, cut // g))] if cut else []
    return head + [(slice(cut, n), replace(spec, group_size=n % g), slice(cut // g, cut // g + 1))]


def _part(t: torch.Tensor | None, groups: slice) -> torch.Tensor | None:
    return None if t is None else t[:, groups]                   # [rows, G_p, 1] of [rows, G, 1]


def _cat(ts) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)           # along columns / groups


def quantize_weight(w: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
                    hi: torch.Tensor | None = None,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_groups of w [out, in] by weight_parts (a short last group allowed) -> (codes [out, in],
    scale [rows, G, 1], zero [rows, G, 1]); lo/hi [rows, G, 1]; rows = 1 per tensor, else out."""
    parts = [quantize_groups(w[:, cols], sub, _part(lo, g), _part(hi, g), scale_dtype)
             for cols, sub, g in weight_parts(spec, w.shape[1])]
    q, scale, zero = (_cat(t) for t in zip(*parts))
    return q, scale, zero


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
                         hi: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fake_quantize of w [out, in] by weight_parts (a short last group allowed), in w's dtype."""
    return _cat([fake_quantize(w[:, cols], sub, _part(lo, g), _part(hi, g), scale_dtype)
                 for cols, sub, g in weight_parts(spec, w.shape[1])])          # [out, in]


# ----------------------------------------------------------------------------- activations

def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantization: x [..., d] -> (q int8 [..., d], scale [..., 1])."""
    spec = QuantSpec(bits=bits, symmetric=True, group_size=-1)
    q, scale, _ = quantize_groups(x, spec)  # scale [..., 1, 1]
    return q, scale.squeeze(-1)  # [..., 1]


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_per_token: q [..., d], scale [..., 1] -> reals [..., d]."""
    return dequantize(q, scale, 0, QuantSpec(bits=8, symmetric=True, group_size=-1), dtype)


# ----------------------------------------------------------------------------- fp8

def fp8_dtype(fmt: str) -> torch.dtype:
    """torch dtype of an fp8 format name ('e4m3' -> float8_e4m3fn, 'e5m2' -> float8_e5m2)."""
    if fmt not in FP8_FORMATS:
        raise LowbitError(f"fp8 format must be one of {sorted(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def fp8_scale(x: torch.Tensor, fmt: str = "e4m3", per_channel: bool = False) -> torch.Tensor:
    """scale = amax / finfo.max, per tensor ([1, ..., 1]) or per row ([..., 1]); float32."""
    fmax = torch.finfo(fp8_dtype(fmt)).max
    a = x.detach().float().abs()
    amax = a.amax(dim=-1, keepdim=True) if per_channel else a.amax().reshape([1] * x.ndim)
    scale = amax / fmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_quantize(x: torch.Tensor, fmt: str = "e4m3", per_channel: bool = False,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8 codes, float32 scale) with real = code * scale; pass scale for static scaling."""
    dt = fp8_dtype(fmt)
    fmax = torch.finfo(dt).max
    if scale is None:
        scale = fp8_scale(x, fmt, per_channel)
    # Always divide in float32 (a float64 divide then cast could round twice differently).
    # Clamp because a static scale may under-cover x, and e4m3fn has no inf (overflow is NaN).
    q = (x.float() / scale.float()).clamp(-fmax, fmax).to(dt)
    return q, scale.float()


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 codes * scale, returned in dtype."""
    return (q.float() * scale.float()).to(dtype)


# ----------------------------------------------------------------------------- packing

def packed_numel(n: int, bits: int) -> int:
    """Bytes that pack() uses for n codes of `bits` bits: ceil(n * bits / 8)."""
    return (n * bits + 7) // 8


def _check_pack(t: torch.Tensor, bits: int, what: str):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer in [1, 8] for packing, got {bits!r}")
    if t.ndim == 0:
        raise LowbitError(f"{what} must have at least one dim (packing runs along the last dim)")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise LowbitError(f"{what} must be an integer tensor, got {t.dtype}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] densely along the last dim -> uint8 [..., ceil(n*bits/8)].

    Layout: a little-endian bitstream; code j occupies bits [j*bits, (j+1)*bits) of the
    row, low bits first. So int4 is two per byte (code 2i in the low nibble), int2 four
    per byte, int3 eight codes per 3 bytes, int8 a passthrough. Codes are taken modulo
    2^bits, so signed (two's complement) codes pack too; unpack(signed=True) restores them.
    """
    _check_pack(q, bits, "q")
    lead, n = q.shape[:-1], q.shape[-1]
    mask = (1 << bits) - 1
    if bits == 8:
        return (q.to(torch.int16) & 0xFF).to(torch.uint8)  # [..., n], two's complement bytes
    if 8 % bits == 0:  # fast path for 1/2/4 bits, same layout: whole codes per byte
        per = 8 // bits
        nb = (n + per - 1) // per
        v = (q.to(torch.int16) & mask).to(torch.uint8)  # [..., n]
        v = F.pad(v, (0, nb * per - n)).reshape(*lead, nb, per)  # [..., nb, per]
        out = v[..., 0].clone()  # [..., nb]
        for k in range(1, per):
            out |= v[..., k] << (k * bits)
        return out
    n8 = (n + 7) // 8
    wide = torch.int32 if bits <= 3 else torch.int64  # a word of 8 codes has 8*bits bits
    v = q.to(wide) & mask  # [..., n]
    v = F.pad(v, (0, n8 * 8 - n))  # [..., n8*8], zero codes fill the tail
    v = v.reshape(*lead, n8, 8)  # [..., n8, 8]: 8 codes = exactly `bits` bytes
    shifts = torch.arange(8, device=q.device, dtype=wide) * bits
    word = (v << shifts).sum(-1, dtype=wide)  # [..., n8], disjoint bit fields so sum == OR
    byte_shifts = torch.arange(bits, device=q.device, dtype=wide) * 8
    by = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., n8, bits]
    by = by.reshape(*lead, n8 * bits)[..., :packed_numel(n, bits)]  # dropped tail bytes are 0
    return by.to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, signed: bool = False) -> torch.Tensor:
    """Inverse of pack: uint8 [..., ceil(n*bits/8)] -> codes [..., n] (int8 if signed else uint8)."""
    _check_pack(packed, bits, "packed")
    if packed.dtype != torch.uint8:
        raise LowbitError(f"packed must be uint8 (from pack()), got {packed.dtype}")
    if packed.shape[-1] != packed_numel(n, bits):
        raise LowbitError(
            f"packed last dim is {packed.shape[-1]} bytes but n={n} codes of {bits} bits need {packed_numel(n, bits)}")
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if bits == 8:
        v = packed.to(torch.int16)  # [..., n]
    elif 8 % bits == 0:  # fast path for 1/2/4 bits
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        v = (packed.unsqueeze(-1) >> shifts) & mask  # [..., nb, per]
        v = v.reshape(*lead, -1)[..., :n].to(torch.int16)  # [..., n]
    else:
        n8 = (n + 7) // 8
        wide = torch.int32 if bits <= 3 else torch.int64
        by = F.pad(packed.to(wide), (0, n8 * bits - packed.shape[-1]))  # [..., n8*bits]
        by = by.reshape(*lead, n8, bits)  # [..., n8, bits]
        byte_shifts = torch.arange(bits, device=packed.device, dtype=wide) * 8
        word = (by << byte_shifts).sum(-1, dtype=wide)  # [..., n8]
        shifts = torch.arange(8, device=packed.device, dtype=wide) * bits
        v = (word.unsqueeze(-1) >> shifts) & mask  # [..., n8, 8]
        v = v.reshape(*lead, n8 * 8)[..., :n]  # [..., n]
    if signed:
        v = torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)  # sign-extend
        return v.to(torch.int8)
    return v.to(torch.uint8)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Same bitstream as pack(), in int32 words [..., ceil(bytes/4)] (byte k of a word = bits 8k..8k+7).

    For bits 2/4/8 that is 16/8/4 codes per word, code 0 in the lowest bits (sequential
    order, as GPTQ; AWQ's interleaved order is not used). Endianness-independent.
    """
    by = pack(q, bits).to(torch.int64)  # [..., nb]
    nw = (by.shape[-1] + 3) // 4
    by = F.pad(by, (0, nw * 4 - by.shape[-1]))  # [..., nw*4]
    by = by.reshape(*by.shape[:-1], nw, 4)  # [..., nw, 4]
    shifts = torch.arange(4, device=by.device, dtype=torch.int64) * 8
    word = (by << shifts).sum(-1)  # [..., nw], unsigned 32-bit value
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # wrap to int32


def unpack_int32(packed: torch.Tensor, bits: int, n: int, signed: bool = False) -> torch.Tensor:
    """Inverse of pack_int32: int32 [..., nw] -> codes [..., n]."""
    if packed.dtype != torch.int32:
        raise LowbitError(f"packed must be int32 (from pack_int32()), got {packed.dtype}")
    nb = packed_numel(n, bits)
    if packed.shape[-1] != (nb + 3) // 4:
        raise LowbitError(
            f"packed last dim is {packed.shape[-1]} words but n={n} codes of {bits} bits need {(nb + 3) // 4}")
    w = packed.to(torch.int64) & 0xFFFFFFFF  # [..., nw], as unsigned
    shifts = torch.arange(4, device=packed.device, dtype=torch.int64) * 8
    by = (w.unsqueeze(-1) >> shifts) & 0xFF  # [..., nw, 4]
    by = by.reshape(*w.shape[:-1], -1)[..., :nb].to(torch.uint8)  # [..., nb]
    return unpack(by, bits, n, signed)
