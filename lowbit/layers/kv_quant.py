"""KV-cache quantization: int8 or fp8 (e4m3) keys/values with a scale per token and head.

A scale per (token, head) depends only on that token's vector, so quantizing when a token is written to
the cache and quantize-dequantizing it inside a full forward (evaluation) give identical numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.analysis.memory import kv_token_bytes
from lowbit.errors import LowbitError
from lowbit.kernels.primitives import dequantize_per_token, fp8_dequantize, fp8_quantize, quantize_per_token

KV_DTYPES = ("int8", "fp8")


@dataclass(frozen=True)
class KVQuant:
    dtype: str = "int8"                 # "int8" (symmetric absmax) | "fp8" (e4m3)

    def __post_init__(self):
        if self.dtype not in KV_DTYPES:
            raise LowbitError(f"--kv-cache: expected one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.dtype == "int8" else torch.float8_e4m3fn

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., head_dim] -> (codes [..., head_dim] 1 byte each, scale float32 [..., 1])."""
        if self.dtype == "int8":
            return quantize_per_token(x)
        return fp8_quantize(x, "e4m3", per_channel=True)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.dtype == "int8":
            return dequantize_per_token(codes, scale, dtype)
        return fp8_dequantize(codes, scale, dtype)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What the cache gives back for x: quantize then dequantize, in x's dtype."""
        return self.dequantize(*self.quantize(x), x.dtype)

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int, scale_bytes: int = 4) -> int:
        """K and V, every layer: 1-byte codes plus one scale per head."""
        return kv_token_bytes(num_layers, num_kv_heads, head_dim, 1, scale_bytes)
