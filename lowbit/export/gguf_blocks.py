"""Tensors as GGUF block bytes: lowbit's codes repacked where its grid is a GGUF block format, else quantized.

GGUF's legacy block formats cover 32 consecutive weights of a row with fp16 constants:

    Q4_0  d | 16 bytes of nibbles       w = d * (q - 8),  q in [0, 15]
    Q4_1  d | m | 16 bytes of nibbles   w = d * q + m,    q in [0, 15]
    Q8_0  d | 32 signed bytes           w = d * q,        q in [-128, 127]

(nibble j of a block holds weight j in its low half and weight j + 16 in its high half). lowbit's grids map
onto them code for code:

    int4 symmetric, group 32          real = s * q, q in [-8, 7]        -> Q4_0 with q + 8, d = s
    int4 asymmetric float zero, g 32  real = s * q + z, q in [0, 15]    -> Q4_1 with d = s, m = z
    int4 asymmetric int zero, g 32    real = s * (q - z), q in [0, 15]  -> Q4_1 with d = s, m = -s * z
    int8 symmetric, group 32          real = s * q, q in [-128, 127]    -> Q8_0 with d = s

so the codes are copied, never re-rounded. The constants are exact when lowbit stored them in fp16 (its
default: scales are rounded to their storage dtype before the codes are chosen); a bf16/fp32 scale, and the
product -s * z of an integer zero point, is rounded to fp16 here, which the export's report counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError

BLOCK = 32
# GGUF type -> (bits, symmetric) of the lowbit grid it holds without re-rounding (group size 32)
GRIDS = {"Q4_0": (4, True), "Q4_1": (4, False), "Q8_0": (8, True)}


@dataclass(frozen=True)
class Packed:
    """A tensor's GGUF bytes [rows, bytes per row] and whether they reproduce lowbit's weights exactly."""
    data: np.ndarray
    exact: bool


def _fp16(t: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """t as fp16 and whether that was exact; a value beyond fp16's range is refused (it would become inf)."""
    h = t.to(torch.float16)
    if not bool(torch.isfinite(h).all()) and bool(torch.isfinite(t).all()):
        raise LowbitError(f"{what}: a value beyond fp16's range ({float(t.abs().max()):g}) cannot be a GGUF "
                          f"block constant")
    return h, bool((h.to(t.dtype) == t).all())


def grid_name(layer) -> str:
    """A quantized layer's grid in words, for refusals (`int4-asym-g128 weight_only`)."""
    spec = getattr(layer, "spec", None)
    return f"{spec.tag} {layer.kind}" if spec is not None else f"a {layer.kind or type(layer).__name__} layer"


def repack(layer, qtype: str, name: str) -> Packed:
    """A WeightOnlyLinear's codes as `qtype` blocks [out, in/32 * bytes per block], or a one-line refusal
    naming the module, its grid and the format asked for."""
    from lowbit.layers.weight_only import WeightOnlyLinear

    bits, sym = GRIDS[qtype]
    spec = getattr(layer, "spec", None)
    fits = (isinstance(layer, WeightOnlyLinear) and spec.bits == bits and spec.symmetric == sym
            and spec.group_size == BLOCK and layer.in_features % BLOCK == 0 and layer.g_idx is None)
    if not fits:
        want = f"int{bits}-{'sym' if sym else 'asym'}-g{BLOCK} weight-only"
        why = " (act-order groups are not contiguous)" if getattr(layer, "act_order", False) else ""
        raise LowbitError(f"{name}: its {grid_name(layer)} codes{why} do not map to --type {qtype} "
                          f"(which holds {want} codes); export --type F16/F32, or quantize with that grid")
    q = layer.codes()                                                   # [out, in]
    out_f, in_f = q.shape
    nb = in_f // BLOCK
    s = layer.scale.float() if layer.scale.dtype != torch.float64 else layer.scale    # [out, nb]
    d, exact = _fp16(s, f"{name}: scale")
    consts = [d]
    if qtype == "Q4_1":
        z = layer.zero.to(s.dtype)                                      # [out, nb]
        m = z if spec.float_zero else -s * z                            # real = s*q + m
        m16, m_exact = _fp16(m, f"{name}: offset")
        consts.append(m16)
        exact = exact and m_exact
    consts_bytes = [c.contiguous().view(torch.uint8).reshape(out_f, nb, 2) for c in consts]   # [out, nb, 2] each
    if qtype == "Q8_0":
        qs = q.to(torch.int8).contiguous().view(torch.uint8).reshape(out_f, nb, BLOCK)        # [out, nb, 32]
    else:
        u = (q.to(torch.int16) + (8 if sym else 0)).to(torch.uint8).reshape(out_f, nb, BLOCK)  # [out, nb, 32]
        qs = u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << 4)                                 # [out, nb, 16]
    blocks = torch.cat([*consts_bytes, qs], dim=-1)                     # [out, nb, bytes per block]
    return Packed(blocks.reshape(out_f, -1).numpy(), exact)


def quantize_float(w: np.ndarray, qtype: str, name: str) -> np.ndarray:
    """A float tensor in GGUF type `qtype` through the gguf package's quantizers: float32/float16 arrays as they
    are, block types as uint8 [rows, bytes per row]."""
    import gguf

    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == "F32":
        return w
    if qtype == "F16":
        if np.isfinite(w).all() and not np.isfinite(w.astype(np.float16)).all():
            raise LowbitError(f"{name}: a weight beyond fp16's range ({float(np.abs(w).max()):g}); use --type F32")
        return w.astype(np.float16)
    t = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if w.shape[-1] % block:
        raise LowbitError(f"{name}: rows of {w.shape[-1]} weights are not a multiple of {qtype}'s block of {block}")
    return gguf.quants.quantize(w, t)


def permute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rotate-half RoPE: within each head, the rows of the first and second
    halves interleaved (row i of the first half, then row i of the second). Works on float rows and on packed
    block rows alike (a row's bytes move as a whole), and on 1-d biases."""
    rows = a.shape[0]
    hd = rows // n_heads
    return a.reshape(n_heads, 2, hd // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)  # [H, hd/2, 2, ...]
