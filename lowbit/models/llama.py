"""One decoder for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

Module names follow Hugging Face's (`model.layers.3.self_attn.q_proj`), so HF state dicts load as they are
and every projection is a plain `nn.Linear` a quantizer can find and swap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ModelConfig
from lowbit.kernels import use_kernels
from lowbit.models.arch import arch_of
from lowbit.models.kv_cache import KVCache, QuantizedKVCache
from lowbit.models.rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x) and self.weight.dtype == x.dtype:
            from lowbit.kernels.fused import rms_norm
            return rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one op, bitwise the same as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 as the reference does: bf16 sums of squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=cfg.attention_out_bias)
        self.kv_quant = None  # a lowbit.layers.kv_quant.KVQuant when the KV cache is quantized

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if getattr(cache, "fused_attention", False):  # the engine's GPU decode: store + paged kernel
            o = cache.attention(self.layer_idx, q, k, v)                       # [B, H, T, hd]
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                           # [B, Hkv, S, hd]
        elif self.kv_quant is not None:  # no cache (evaluation): see exactly what a quantized cache returns
            k, v = self.kv_quant.roundtrip(k), self.kv_quant.roundtrip(v)
        rep = self.n_heads // self.n_kv
        # GQA: each KV head serves `rep` consecutive query heads. On the CPU, SDPA's enable_gqa does that without
        # copying k/v (bitwise the same result); elsewhere the copies keep every SDPA backend available.
        gqa = rep > 1 and x.device.type == "cpu"
        if rep > 1 and not gqa:
            S = k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv, rep, S, self.hd).reshape(B, self.n_heads, S, self.hd)
            v = v[:, :, None].expand(B, self.n_kv, rep, S, self.hd).reshape(B, self.n_heads, S, self.hd)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)             # [B, T, H*hd]
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=b)
        self.up_proj = nn.Linear(d, f, bias=b)
        self.down_proj = nn.Linear(f, d, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if use_kernels(g):
            from lowbit.kernels.fused import silu_mul
            return self.down_proj(silu_mul(g, u))
        return self.down_proj(F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    # The two residual halves are separate so that a calibration walk can run (and stop) one at a time;
    # BlockLayout.stages names them.
    def attn_residual(self, x, cos, sin, cache=None, mask=None):
        return x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)

    def mlp_residual(self, x, cos=None, sin=None):
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, cache=None, mask=None):
        return self.mlp_residual(self.attn_residual(x, cos, sin, cache, mask))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM: `forward(ids, positions, cache) -> logits`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE frequencies; models built on the meta device call this once filled in."""
        cfg = self.config
        inv_freq, self.rope_attn_scale = rope_inv_freq(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    @property
    def arch(self):
        """The architecture record (lowbit.models.arch.Arch): block layout, special modules, names."""
        return arch_of(self.config)

    def save_pretrained(self, out, tokenizer=None, *, method: dict, calibration: dict | None = None,
                        report: dict | None = None, overwrite: bool = False, kv_cache: str | None = None,
                        save_dtype: str | None = "fp16", format: str = "lowbit"):
        """Write this (quantized) model as a checkpoint directory, lowbit's or one of lowbit.formats
        (compressed-tensors, gptq, awq); `lowbit.load(out)` reads it back."""
        from lowbit.models.checkpoint import save_quantized
        return save_quantized(self, tokenizer, out, method, calibration, report, overwrite=overwrite,
                              kv_cache=kv_cache, save_dtype=save_dtype, format=format)

    @property
    def kv_quant(self):
        return self.model.layers[0].self_attn.kv_quant

    def set_kv_quant(self, kv_quant) -> None:
        """Quantize keys/values (int8/fp8 KVQuant, or None for full precision) in every layer."""
        for layer in self.model.layers:
            layer.self_attn.kv_quant = kv_quant

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """A contiguous KV cache matching this model (quantized when the model's KV cache is)."""
        if self.kv_quant is not None:
            return QuantizedKVCache(self.config, batch, max_len, self.dtype, self.device, self.kv_quant, pad)
        return KVCache(self.config, batch, max_len, self.dtype, self.device, pad)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None):
        """ids [B, T] -> (hidden [B, T, d], cos, sin, mask): what every decoder block takes besides x."""
        B, T = ids.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=ids.device).expand(B, T)
            if cache is not None and cache.pad is not None:
                positions = (positions - cache.pad[:, None]).clamp(min=0)
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_attn_scale, x.dtype)
        mask = cache.attn_mask(T) if cache is not None else None
        return x, cos, sin, mask

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only). Appends to `cache` if given."""
        x, cos, sin, mask = self.embed(ids, positions, cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.head(x)
