"""AWQ's GEMM layout (quant_method "awq", version "gemm"), as autoawq saves it (WQLinear_GEMM) and transformers
(through gptqmodel) loads it.

Per quantized Linear `<name>` (4-bit codes only; 8 codes per int32 word):

  <name>.qweight  int32 [in, out/8]  codes packed along the OUTPUT dim, interleaved: word (i, c) holds outputs
                                     8c .. 8c+7 of input i, nibble k (bits [4k, 4k+4)) holding output 8c + ORDER[k],
                                     ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  <name>.qzeros   int32 [G, out/8]   integer zero points, the same interleave, stored as they are (no minus one)
  <name>.scales   fp16  [G, out]
  <name>.bias     fp16  [out]        when the Linear has one

Real weight = scales[i // group_size, o] * (code - zero), codes and zeros in [0, 15]. There is no g_idx:
groups are contiguous runs of group_size inputs (act-order cannot be written). group_size -1 is one group per
output channel (autoawq's WQLinear_GEMM takes it as group_size = in_features). The quantization_config is
autoawq's AwqConfig.to_transformers_dict(): quant_method, zero_point, group_size, bits, version,
modules_to_not_convert. A symmetric lowbit layer is written with zero point 8 and its codes shifted by 8; a layer
whose every zero point is 8 is read back as symmetric.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.files import field
from lowbit.formats.gptq import (build_layer, check_common, check_shape, fp16_exact, packed_modules, trivial_g_idx,
                                 unsigned_codes_and_zeros, weight_only_layers)
from lowbit.kernels.primitives import pack_int32, unpack_int32

NAME = "awq"
BITS = 4
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # nibble k of a word holds column ORDER[k] of its 8
REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j is in nibble REVERSE_ORDER[j]


def pack_awq(t: torch.Tensor) -> torch.Tensor:
    """4-bit values [rows, out] -> int32 [rows, out/8] in AWQ's interleaved order."""
    rows, out = t.shape
    inter = t.reshape(rows, out // 8, 8)[:, :, list(ORDER)].reshape(rows, out)   # position k <- column ORDER[k]
    return pack_int32(inter, BITS)


def unpack_awq(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [rows, out/8] in AWQ's interleaved order -> uint8 values [rows, out]."""
    inter = unpack_int32(packed, BITS, out_features)                              # nibble order
    rows = inter.shape[0]
    return inter.reshape(rows, out_features // 8, 8)[:, :, list(REVERSE_ORDER)].reshape(rows, out_features)


# ----------------------------------------------------------------------------- export

def export(model, method: dict | None = None):
    """(quantization_config, tensors) of `model`'s quantized Linears in autoawq's GEMM layout."""
    layers = weight_only_layers(model, NAME)
    first_name, first = layers[0]
    tensors = {}
    for name, layer in layers:
        check_common(NAME, name, layer, (BITS,))
        spec = layer.spec
        if layer.g_idx is not None and not torch.equal(layer.g_idx.detach().to(torch.int32).cpu(),
                                                       trivial_g_idx(layer.in_features, spec.group_size)):
            raise LowbitError(f"--format awq: module {name} has act-order groups (g_idx, --act-order), which awq "
                              f"cannot hold (groups are contiguous runs of inputs); quantize with --act-order "
                              f"--static-groups, or use --format gptq or lowbit")
        if spec.group_size != first.spec.group_size:
            raise LowbitError(f"--format awq: modules {first_name} ({first.spec.tag}) and {name} ({spec.tag}) "
                              f"have different group sizes, and an awq checkpoint has one global group_size; use "
                              f"--format compressed-tensors or lowbit")
        q, z = unsigned_codes_and_zeros(layer)                                   # [out, in], [out, G]
        t = {"qweight": pack_awq(q.t().contiguous().cpu()),                     # [in, out/8]
             "qzeros": pack_awq(z.t().contiguous().cpu()),                      # [G, out/8]
             "scales": fp16_exact(NAME, name, "scales", layer.scale).t().contiguous().cpu()}   # [G, out]
        if layer.bias is not None:
            t["bias"] = fp16_exact(NAME, name, "bias", layer.bias).cpu()
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    qc = {"quant_method": "awq", "zero_point": True, "group_size": first.spec.group_size, "bits": BITS,
          "version": "gemm", "modules_to_not_convert": None}
    return qc, tensors


# ----------------------------------------------------------------------------- import

def _config(qc: dict, where: str) -> int:
    """The group size of an AWQ GEMM quantization_config, each field checked."""
    w = f"{where}: quantization_config"
    bits = field(qc, "bits", int, w, 4) if "bits" in qc else field(qc, "w_bit", int, w, 4)
    if bits != BITS:
        raise LowbitError(f"{w}: field 'bits' must be 4 (AWQ's GEMM layout), got {bits}")
    key = "version" if qc.get("version") is not None else "format"
    version = field(qc, key, str, w, "gemm").lower()
    if version != "gemm":
        raise LowbitError(f"{w}: field {key!r} must be 'gemm', got {version!r} (AWQ's other layouts are not read "
                          f"by lowbit)")
    if not field(qc, "zero_point", bool, w, True):
        raise LowbitError(f"{w}: field 'zero_point' is false: AWQ's GEMM layout stores zero points, lowbit reads "
                          f"zero_point true only")
    gs = field(qc, "group_size", int, w, 128) if "group_size" in qc else field(qc, "q_group_size", int, w, 128)
    if gs < -1 or gs == 0:
        raise LowbitError(f"{w}: field 'group_size' must be -1 (per channel) or a positive group length, got {gs}")
    return gs


def import_layers(quantization_config: dict, sd: dict[str, torch.Tensor], where: str) -> dict:
    """lowbit layers for every quantized Linear of an AWQ GEMM checkpoint; pops their tensors."""
    gs = _config(quantization_config, where)
    layers = {}
    for name, qweight, qzeros, scales, bias in packed_modules(sd, "awq", where):
        in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
        layer_gs = -1 if gs == -1 or gs > in_f else gs            # a group wider than the layer: per channel
        if layer_gs > 0 and in_f % layer_gs:
            raise LowbitError(f"{where}: module {name}: in_features={in_f} is not a multiple of group_size {gs}")
        want_g = 1 if layer_gs == -1 else in_f // layer_gs
        check_shape(scales, (want_g, out_f), name, "scales", where, f" (group_size {gs}, in_features {in_f})")
        check_shape(qzeros, (want_g, out_f // 8), name, "qzeros", where)
        if bias is not None:
            check_shape(bias, (out_f,), name, "bias", where)
        q = unpack_awq(qweight, out_f).t().contiguous()      # [out, in]
        zeros = unpack_awq(qzeros, out_f)                     # [G, out]
        layers[name] = build_layer(name, q, zeros, scales, bias, None, BITS, layer_gs,
                                   bool((zeros == 8).all()), where)
    return layers
