"""Dequantize llama.cpp's GGUF tensor types into torch (vectorised over blocks).

Each `_q*` function takes the raw bytes of one tensor as uint8 [rows, bytes_per_row] and returns
float32 [rows, row_elems]. Block layouts follow ggml's `block_q*` structs (ggml-common.h).
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import LowbitError


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2k] -> float32 [..., k] reading little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    rows = raw.shape[0]
    return raw.reshape(rows, -1, block_bytes)  # [rows, n_blocks, block_bytes]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> [..., 32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 34)                                        # d f16 | qs i8[32]
    d, q = _f16(b[..., :2]), b[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).flatten(1)


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 18)                                        # d f16 | qs u8[16]
    d, q = _f16(b[..., :2]), _nibbles(b[..., 2:]).float()
    return (d * (q - 8)).flatten(1)


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 20)                                        # d f16 | m f16 | qs u8[16]
    d, m, q = _f16(b[..., :2]), _f16(b[..., 2:4]), _nibbles(b[..., 4:]).float()
    return (d * q + m).flatten(1)


def _q5_high_bits(qh_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4] (a little-endian uint32) -> the 5th bit of each of 32 elements, [..., 32]."""
    qh = qh_bytes.to(torch.int64)
    word = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    return (word[..., None] >> torch.arange(32, device=qh.device)) & 1


def _q5_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 22)                                        # d f16 | qh u32 | qs u8[16]
    d = _f16(b[..., :2])
    q = _nibbles(b[..., 6:]).to(torch.int64) | (_q5_high_bits(b[..., 2:6]) << 4)
    return (d * (q.float() - 16)).flatten(1)


def _q5_1(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 24)                                        # d f16 | m f16 | qh u32 | qs u8[16]
    d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
    q = _nibbles(b[..., 8:]).to(torch.int64) | (_q5_high_bits(b[..., 4:8]) << 4)
    return (d * q.float() + m).flatten(1)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [..., 8]."""
    s = s.to(torch.int64)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).float(), torch.cat([lo_m, hi_m], -1).float()


def _q4_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 144)                       # d f16 | dmin f16 | scales u8[12] | qs u8[128]
    R, N = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])               # [R, N, 1]
    sc, mn = _k_scales_mins(b[..., 4:16])                        # [R, N, 8]
    qs = b[..., 16:].reshape(R, N, 4, 32)                        # four chunks of 32 bytes = 64 values
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(R, N, 8, 32).float()  # sub-block 2i: low, 2i+1: high
    w = (d * sc)[..., None] * q - (dmin * mn)[..., None]         # [R, N, 8, 32]
    return w.reshape(R, -1)


def _q6_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 210)                       # ql u8[128] | qh u8[64] | scales i8[16] | d f16
    R, N = b.shape[:2]
    ql = b[..., :128].reshape(R, N, 2, 64).to(torch.int64)      # two halves of 128 values
    qh = b[..., 128:192].reshape(R, N, 2, 32).to(torch.int64)
    sc = b[..., 192:208].contiguous().view(torch.int8).float().reshape(R, N, 2, 8)
    d = _f16(b[..., 208:210])[..., None]                          # [R, N, 1, 1]
    lo, hi = ql[..., :32], ql[..., 32:]
    q = torch.stack([                                           # four runs of 32 per half
        (lo & 0x0F) | (((qh >> 0) & 3) << 4),
        (hi & 0x0F) | (((qh >> 2) & 3) << 4),
        (lo >> 4) | (((qh >> 4) & 3) << 4),
        (hi >> 4) | (((qh >> 6) & 3) << 4),
    ], dim=3).float() - 32                                      # [R, N, 2, 4, 32]
    scale = sc.reshape(R, N, 2, 4, 2)                           # a scale per 16 values
    q = q.reshape(R, N, 2, 4, 2, 16)
    return (d[..., None, None] * scale[..., None] * q).reshape(R, -1)


# GGML type name -> (dequantizer over raw bytes, or None for plain float arrays)
DEQUANTIZERS = {
    "F32": None, "F16": None, "F64": None, "BF16": "bf16",
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q6_K": _q6_k,
}


def _with_gguf(data: np.ndarray, type_name: str, name: str) -> torch.Tensor:
    """The other block types the `gguf` package dequantizes (Q2_K, Q3_K, Q5_K, IQ*, TQ*, MXFP4, ...), in numpy:
    slower than the torch paths above, but a file using them loads instead of being refused."""
    import gguf
    from gguf.quants import dequantize as gguf_dequantize

    integer = type_name in ("I8", "I16", "I32", "I64")   # integer tensors are not weights
    qtype = None if integer else getattr(gguf.GGMLQuantizationType, type_name, None)
    try:
        out = None if qtype is None else gguf_dequantize(np.asarray(data).view(np.uint8), qtype)
    except NotImplementedError:
        out = None
    except (ValueError, TypeError) as e:
        raise LowbitError(f"{name}: {type_name} data does not dequantize ({str(e).splitlines()[0]})") from None
    if out is None:
        raise LowbitError(f"{name}: unsupported GGUF tensor type {type_name} "
                          f"(supported: {', '.join(DEQUANTIZERS)} and the types gguf.quants dequantizes)")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """GGUF tensor data (as `gguf.GGUFReader` exposes it) -> float32 torch tensor of `shape` (torch order)."""
    if type_name not in DEQUANTIZERS:
        t = _with_gguf(data, type_name, name)
    elif (fn := DEQUANTIZERS[type_name]) is None:
        t = torch.from_numpy(np.array(data, copy=True)).float()
    elif fn == "bf16":
        # BF16 arrives as raw uint8/uint16 bytes: widen to fp32 by placing them in the high half.
        u16 = torch.from_numpy(np.ascontiguousarray(data).view(np.uint16).astype(np.int32))
        t = (u16 << 16).view(torch.float32)
    else:
        raw = torch.from_numpy(np.array(data, copy=True).view(np.uint8))
        t = fn(raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1))
    if t.numel() != int(np.prod(shape)):
        raise LowbitError(f"{name}: {type_name} data holds {t.numel()} values, expected shape {tuple(shape)}")
    return t.reshape(shape)
