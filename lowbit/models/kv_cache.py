"""A contiguous per-sequence KV cache (the paged one lives in lowbit.engine)."""
from __future__ import annotations

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError


class KVCache:
    """Keys/values for L layers: [B, n_kv, max_len, head_dim] each, rows left-padded by `pad[b]` slots.

    Column j of row b holds that sequence's token at position j - pad[b]; padded columns are masked out.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, pad: torch.Tensor | None = None):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.pos = 0
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, hd] at the next T columns; return all filled columns [B, n_kv, pos+T, hd]."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise LowbitError(f"KV cache full: {end} tokens exceed its max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean mask [B, 1, T, pos+T]: causal and not padding. None when plain causal SDPA suffices."""
        if self.pad is None and (T == 1 or self.pos == 0):
            return None  # decode sees every column; a fresh prefill is plain causal
        S = self.pos + T
        dev = self.k[0].device
        q_col = torch.arange(self.pos, S, device=dev)[:, None]     # [T, 1]
        k_col = torch.arange(S, device=dev)[None, :]                # [1, S]
        mask = (k_col <= q_col)[None, None]                         # [1, 1, T, S]
        if self.pad is not None:
            mask = mask & (k_col >= self.pad[:, None])[:, None, None]  # [B, 1, T, S]
            # A fully padded query row (a pad token itself) would get NaN from softmax: let it see itself.
            mask = mask | (k_col == q_col)[None, None]
        return mask

    def advance(self, T: int) -> None:
        self.pos += T


class QuantizedKVCache(KVCache):
    """The same cache holding 1-byte codes (int8 or fp8) and a float32 scale per token and head."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, kv_quant, pad: torch.Tensor | None = None):
        self.kv_quant, self.dtype = kv_quant, dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        sshape = (batch, cfg.num_kv_heads, max_len, 1)
        self.k = [torch.zeros(shape, dtype=kv_quant.code_dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=kv_quant.code_dtype, device=device) for _ in range(cfg.num_layers)]
        self.k_scale = [torch.ones(sshape, device=device) for _ in range(cfg.num_layers)]
        self.v_scale = [torch.ones(sshape, device=device) for _ in range(cfg.num_layers)]
        self.max_len, self.pos = max_len, 0
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise LowbitError(f"KV cache full: {end} tokens exceed its max_len {self.max_len}")
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.kv_quant.quantize(x)                                     # [B, Hkv, T, hd], [B, Hkv, T, 1]
            codes[layer][:, :, self.pos:end] = q
            scales[layer][:, :, self.pos:end] = s
        deq = self.kv_quant.dequantize
        return (deq(self.k[layer][:, :, :end], self.k_scale[layer][:, :, :end], self.dtype),
                deq(self.v[layer][:, :, :end], self.v_scale[layer][:, :, :end], self.dtype))
