"""The hub's GPTQ layout (quant_method "gptq", checkpoint_format "gptq", i.e. v1), as gptqmodel and auto-gptq
save it and transformers (through gptqmodel) loads it.

Per quantized Linear `<name>` (k = bits, 2 | 4 | 8; p = 32 // k codes per int32 word):

  <name>.qweight  int32 [in/p, out]  codes packed along the INPUT dim: word (r, o) holds the codes of inputs
                                     r*p .. r*p+p-1 of output o, input r*p+j in bits [j*k, (j+1)*k)
  <name>.qzeros   int32 [G, out/p]   zero points packed the same way along the OUTPUT dim, in the v1 "zero
                                     minus one" form: the packed word minus the word with a 1 in every field,
                                     modulo 2^32 (gptqmodel's convert_gptq_v2_to_v1_format); it equals z - 1 in
                                     every field whenever no zero point is 0
  <name>.scales   fp16  [G, out]
  <name>.g_idx    int32 [in]         the group of each input column (i // group_size without act-order)
  <name>.bias     fp16  [out]        when the Linear has one

Codes are unsigned, [0, 2^k - 1]; real weight = scales[g_idx[i], o] * (code - zero). A symmetric checkpoint
("sym": true) has every zero point 2^(k-1): lowbit's signed symmetric codes c are written as c + 2^(k-1).
The quantization_config has the keys of gptqmodel's GPTQConfig.to_dict() (bits, group_size, desc_act, sym,
lm_head, method and quant_method, format and checkpoint_format, pack_dtype, meta); transformers' GPTQConfig
reads bits, group_size, desc_act, sym, format (checkpoint_format overrides it) and meta. The whole model has one
spec; desc_act is true when any layer is an act-order one. Reading, a layer is act-order when desc_act is true or
its g_idx is not i // group_size, and symmetric when "sym" is true and every zero point is 2^(k-1).

A zero point of 0 (an asymmetric group whose values are all >= 0) borrows from the next field in the v1 form:
gptqmodel reads it back exactly (its v1 -> v2 conversion adds the same word); readers that add 1 field by field
(auto-gptq, exllama-style kernels) misread the field above it.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.files import field
from lowbit.kernels.primitives import QuantSpec, pack_int32, unpack_int32
from lowbit.layers import FakeQuantLinear, FP8Linear, Int8Linear, MixedInt8Linear, WeightOnlyLinear

NAME = "gptq"
BITS = (2, 4, 8)

# The formats that hold what gptq (or awq) cannot, per kind of lowbit layer.
_OTHER_LAYERS = {
    Int8Linear: ("W8A8 int8 layers (Int8Linear)", "compressed-tensors"),
    FP8Linear: ("W8A8 fp8 layers (FP8Linear)", "compressed-tensors"),
    MixedInt8Linear: ("LLM.int8()'s outlier decomposition (MixedInt8Linear, --method llm_int8)", "lowbit"),
    FakeQuantLinear: ("fake-quant (quantize-dequantize) layers (FakeQuantLinear, e.g. ZeroQuant's)", "lowbit"),
}


# ----------------------------------------------------------------------------- packing

def ones_word(bits: int) -> int:
    """The int32 word with a 1 in every k-bit field: 0x55555555 (2-bit), 0x11111111 (4), 0x01010101 (8)."""
    return sum(1 << (j * bits) for j in range(32 // bits))


def _wrap_int32(w: torch.Tensor) -> torch.Tensor:
    """int64 values taken modulo 2^32, as int32 (two's complement)."""
    w = w & 0xFFFFFFFF
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [out, in] -> qweight int32 [in*bits/32, out] (packed along the input dim)."""
    return pack_int32(codes, bits).t().contiguous()        # pack_int32 packs the last dim: [out, in/p] -> T


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [in*bits/32, out] -> unsigned codes uint8 [out, in]."""
    return unpack_int32(qweight.t().contiguous(), bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int, v1: bool = True) -> torch.Tensor:
    """Integer zero points [G, out] -> qzeros int32 [G, out*bits/32]; v1: minus one (word-wise, mod 2^32)."""
    packed = pack_int32(zeros, bits)
    return _wrap_int32(packed.to(torch.int64) - ones_word(bits)) if v1 else packed


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """qzeros int32 [G, out*bits/32] -> zero points uint8 [G, out]; v1: plus one (word-wise, mod 2^32)."""
    if v1:
        qzeros = _wrap_int32(qzeros.to(torch.int64) + ones_word(bits))
    return unpack_int32(qzeros, bits, out_features)


# ----------------------------------------------------------------------------- export helpers (shared with awq)

def refuse_other_layer(fmt: str, name: str, layer) -> LowbitError:
    """The refusal of a quantized layer that is not weight-only."""
    what, other = _OTHER_LAYERS.get(type(layer), (type(layer).__name__, "lowbit"))
    return LowbitError(f"--format {fmt}: module {name} is one of the {what}; {fmt} holds weight-only layers; "
                       f"use --format {other}")


def weight_only_layers(model, fmt: str) -> list[tuple[str, WeightOnlyLinear]]:
    """The model's quantized Linears, all WeightOnlyLinear (else one refusal); the KV-cache quantization refused."""
    kv = getattr(model, "kv_quant", None)
    if kv is not None:
        raise LowbitError(f"--format {fmt}: --kv-cache {getattr(kv, 'dtype', kv)} quantizes the KV cache, which a "
                          f"{fmt} checkpoint cannot describe; drop --kv-cache or use --format lowbit")
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyLinear):
            layers.append((name, m))
        elif hasattr(m, "layer_config"):   # every other lowbit quantized layer
            raise refuse_other_layer(fmt, name, m)
    if not layers:
        raise LowbitError(f"--format {fmt}: the model has no quantized layers to export")
    return layers


def check_common(fmt: str, name: str, layer: WeightOnlyLinear, bits_allowed: tuple[int, ...]) -> None:
    """What neither gptq nor awq holds: per tensor, float zero points, other bits, a short last group."""
    spec = layer.spec
    if spec.group_size == 0:
        raise LowbitError(f"--format {fmt}: module {name} has one scale per tensor (--group-size 0), which {fmt} "
                          f"cannot hold (groups or -1 per channel only); use --format compressed-tensors or lowbit")
    if spec.float_zero:
        raise LowbitError(f"--format {fmt}: module {name} has a real-valued zero offset (--zero-point float), "
                          f"which {fmt} cannot hold (integer zero points only); use --zero-point int or "
                          f"--format lowbit")
    if spec.bits not in bits_allowed:
        extra = (" (3-bit GPTQ packs 32 codes in 3 words, a layout lowbit does not write)"
                 if spec.bits == 3 and fmt == NAME else "")
        allowed = " or ".join(map(str, bits_allowed))
        raise LowbitError(f"--format {fmt}: module {name} has {spec.bits}-bit codes (--bits {spec.bits}); {fmt} "
                          f"holds {allowed} bits{extra}; use --format compressed-tensors or lowbit")
    if spec.group_size > 0 and layer.in_features % spec.group_size:
        raise LowbitError(f"--format {fmt}: module {name} has in_features={layer.in_features}, not a multiple of "
                          f"--group-size {spec.group_size} (lowbit's short last group), which {fmt} cannot hold; "
                          f"use a group size that divides every width, or --format lowbit")
    per = 32 // spec.bits
    for what, n in (("out_features", layer.out_features), ("in_features", layer.in_features)):
        if n % per:
            raise LowbitError(f"--format {fmt}: module {name} has {what}={n}, not a multiple of {per} (the "
                              f"{spec.bits}-bit codes one int32 word packs); use --format compressed-tensors or "
                              f"lowbit")


def fp16_exact(fmt: str, name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    """t as fp16, refused when that changes a value (bf16 / fp32 scales that fp16 cannot hold)."""
    h = t.detach().to(torch.float16)
    if t.dtype != torch.float16 and not torch.equal(h.to(t.dtype), t.detach()):
        raise LowbitError(f"--format {fmt}: module {name} stores its {what} in {str(t.dtype).removeprefix('torch.')}"
                          f" with values fp16 cannot hold, and {fmt} stores fp16; quantize with fp16 scale storage "
                          f"or use --format compressed-tensors or lowbit")
    return h.contiguous()


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The group of each input column without act-order: i // group_size, all 0 per channel."""
    if group_size > 0:
        return (torch.arange(in_features) // group_size).to(torch.int32)
    return torch.zeros(in_features, dtype=torch.int32)


def unsigned_codes_and_zeros(layer: WeightOnlyLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int16 [out, in] in [0, 2^k-1], zero points int16 [out, G]); symmetric: shifted by 2^(k-1)."""
    half = 1 << (layer.spec.bits - 1)
    q = layer.codes().to(torch.int16)
    if layer.spec.symmetric:
        return q + half, torch.full(tuple(layer.scale.shape), half, dtype=torch.int16)
    return q, layer.zero.detach().float().round().to(torch.int16)


# ----------------------------------------------------------------------------- export

def export(model, method: dict | None = None):
    """(quantization_config, tensors) of `model`'s quantized Linears in the GPTQ v1 layout."""
    from lowbit import __version__

    layers = weight_only_layers(model, NAME)
    first_name, first = layers[0]
    tensors, desc_act = {}, False
    for name, layer in layers:
        check_common(NAME, name, layer, BITS)
        if layer.spec != first.spec:
            raise LowbitError(f"--format gptq: modules {first_name} ({first.spec.tag}) and {name} "
                              f"({layer.spec.tag}) have different weight specs, and a gptq checkpoint has one "
                              f"global bits / group_size / sym; use --format compressed-tensors or lowbit")
        spec = layer.spec
        q, z = unsigned_codes_and_zeros(layer)                          # [out, in], [out, G]
        g_idx = trivial_g_idx(layer.in_features, spec.group_size)
        if layer.g_idx is not None:
            g_idx = layer.g_idx.detach().to(torch.int32).cpu()
        desc_act = desc_act or layer.act_order
        t = {"qweight": pack_qweight(q.cpu(), spec.bits),                            # [in*k/32, out]
             "qzeros": pack_qzeros(z.t().contiguous().cpu(), spec.bits, v1=True),    # [G, out*k/32]
             "scales": fp16_exact(NAME, name, "scales", layer.scale).t().contiguous().cpu(),   # [G, out]
             "g_idx": g_idx.contiguous()}
        if layer.bias is not None:
            t["bias"] = fp16_exact(NAME, name, "bias", layer.bias).cpu()
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    spec = first.spec
    meta = {"quantizer": [f"lowbit:{__version__}"]}
    method = method or {}
    if method.get("method") == "gptq":
        for ours, theirs in (("percdamp", "damp_percent"), ("static_groups", "static_groups"),
                             ("true_sequential", "true_sequential")):
            if method.get(ours) is not None:
                meta[theirs] = method[ours]
    qc = {"bits": spec.bits, "group_size": spec.group_size, "desc_act": desc_act, "sym": spec.symmetric,
          "lm_head": False, "method": "gptq", "quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
          "pack_dtype": "int32", "meta": meta}
    return qc, tensors


# ----------------------------------------------------------------------------- import

def _config(qc: dict, where: str) -> tuple[int, int, bool, bool, bool]:
    """(bits, group_size, sym, desc_act, v1) from a GPTQ quantization_config, each field checked."""
    w = f"{where}: quantization_config"
    bits = field(qc, "bits", int, w)
    if bits not in BITS:
        extra = " (3-bit GPTQ packs 32 codes in 3 words, a layout lowbit does not read)" if bits == 3 else ""
        raise LowbitError(f"{w}: field 'bits' must be 2, 4 or 8, got {bits}{extra}")
    gs = field(qc, "group_size", int, w, 128)
    if gs < -1 or gs == 0:
        raise LowbitError(f"{w}: field 'group_size' must be -1 (per channel) or a positive group length, got {gs}")
    sym = field(qc, "sym", bool, w, True)
    desc_act = bool(field(qc, "desc_act", (bool, type(None)), w, False))
    key = "checkpoint_format" if qc.get("checkpoint_format") is not None else "format"
    fmt = field(qc, key, str, w, "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{w}: field {key!r} must be 'gptq' (v1) or 'gptq_v2', got {fmt!r} (other gptqmodel "
                          f"layouts are not read by lowbit)")
    pack_dtype = field(qc, "pack_dtype", str, w, "int32")
    if pack_dtype != "int32":
        raise LowbitError(f"{w}: field 'pack_dtype' must be 'int32', got {pack_dtype!r}")
    if field(qc, "is_marlin_format", bool, w, False):
        raise LowbitError(f"{w}: field 'is_marlin_format' is true: the Marlin repacking is not read by lowbit")
    if field(qc, "dynamic", (dict, type(None)), w, None):
        raise LowbitError(f"{w}: field 'dynamic' (per-module overrides of bits / group_size / sym) is not read "
                          f"by lowbit")
    return bits, gs, sym, desc_act, fmt == "gptq"


def pop_tensor(sd: dict, name: str, key: str, where: str, dtypes=None) -> torch.Tensor:
    """sd's `name.key`, removed from it; a one-line error when missing or not of one of `dtypes`."""
    try:
        t = sd.pop(f"{name}.{key}")
    except KeyError:
        raise LowbitError(f"{where}: module {name}: missing tensor {name}.{key}") from None
    if dtypes == "float" and not t.is_floating_point():
        raise LowbitError(f"{where}: tensor {name}.{key} must be floating point, got {t.dtype}")
    if dtypes not in (None, "float") and t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise LowbitError(f"{where}: tensor {name}.{key} must be {want}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def check_shape(t: torch.Tensor, shape: tuple, name: str, key: str, where: str, note: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{where}: tensor {name}.{key} has shape {list(t.shape)}, expected {list(shape)}{note}")


def build_layer(name: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bias, g_idx,
                bits: int, group_size: int, symmetric: bool, where: str) -> WeightOnlyLinear:
    """A WeightOnlyLinear from unsigned codes [out, in], zero points [G, out], scales [G, out] (the formats'
    orientation); symmetric: every zero point is 2^(k-1) and the codes are stored signed."""
    half = 1 << (bits - 1)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    if symmetric:
        codes, zero = (q.to(torch.int16) - half).to(torch.int8), None
    else:
        codes, zero = q, zeros.t().to(scales.dtype)
    try:
        return WeightOnlyLinear.from_quantized(codes, scales.t(), zero, spec, bias, g_idx=g_idx, dtype=scales.dtype)
    except LowbitError as e:
        raise LowbitError(f"{where}: module {name}: {e}") from None


def packed_modules(sd: dict[str, torch.Tensor], quant_method: str, where: str):
    """(name, qweight, qzeros, scales, bias) of every <name>.qweight in sd (GPTQ and AWQ share these names),
    popped from sd and checked for dtype and rank."""
    names = sorted(k[: -len(".qweight")] for k in sd if k.endswith(".qweight"))
    if not names:
        raise LowbitError(f"{where}: quant_method {quant_method}, but the weights hold no <module>.qweight tensor")
    for name in names:
        qweight = pop_tensor(sd, name, "qweight", where, (torch.int32,))
        qzeros = pop_tensor(sd, name, "qzeros", where, (torch.int32,))
        scales = pop_tensor(sd, name, "scales", where, "float")
        bias = sd.pop(f"{name}.bias", None)
        if qweight.ndim != 2 or scales.ndim != 2:
            raise LowbitError(f"{where}: module {name}: qweight and scales must be 2-d, got shapes "
                              f"{list(qweight.shape)} and {list(scales.shape)}")
        yield name, qweight, qzeros, scales, bias


def import_layers(quantization_config: dict, sd: dict[str, torch.Tensor], where: str) -> dict[str, WeightOnlyLinear]:
    """lowbit layers for every quantized Linear of a GPTQ (v1, or gptqmodel's v2) checkpoint; pops their tensors."""
    bits, gs, sym, desc_act, v1 = _config(quantization_config, where)
    per, half = 32 // bits, 1 << (bits - 1)
    layers = {}
    for name, qweight, qzeros, scales, bias in packed_modules(sd, "gptq", where):
        g_idx = sd.pop(f"{name}.g_idx", None)
        in_f, out_f = qweight.shape[0] * per, qweight.shape[1]
        layer_gs = -1 if gs == -1 or gs > in_f else gs                # a group wider than the layer: per channel
        want_g = 1 if layer_gs == -1 else -(-in_f // layer_gs)
        check_shape(scales, (want_g, out_f), name, "scales", where, f" (group_size {gs}, in_features {in_f})")
        if out_f % per:
            raise LowbitError(f"{where}: module {name}: out_features={out_f} is not a multiple of {per}")
        check_shape(qzeros, (want_g, out_f // per), name, "qzeros", where)
        if g_idx is None:
            g_idx = trivial_g_idx(in_f, layer_gs)
        elif g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
            raise LowbitError(f"{where}: tensor {name}.g_idx must be an integer tensor, got {g_idx.dtype}")
        check_shape(g_idx, (in_f,), name, "g_idx", where)
        if bias is not None:
            check_shape(bias, (out_f,), name, "bias", where)
        q = unpack_qweight(qweight, bits, in_f)                       # [out, in]
        zeros = unpack_qzeros(qzeros, bits, out_f, v1=v1)              # [G, out]
        g_idx = g_idx.to(torch.int32)
        # act-order (desc_act, or a g_idx other than i // group_size); a short last group keeps its g_idx too
        keep = (desc_act or not torch.equal(g_idx, trivial_g_idx(in_f, layer_gs))
                or (layer_gs > 0 and in_f % layer_gs != 0))
        layers[name] = build_layer(name, q, zeros, scales, bias, g_idx if keep else None,
                                   bits, layer_gs, sym and bool((zeros == half).all()), where)
    return layers
