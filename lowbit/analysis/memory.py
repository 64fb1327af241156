"""Parameter counts and memory footprints of a Llama-family decoder, from its config alone.

Layout assumed (HF LlamaForCausalLM and relatives): token embedding [V, d]; L decoder layers,
each = RMSNorm -> attention (q, k, v, o projections) -> RMSNorm -> SwiGLU MLP (gate, up, down);
final RMSNorm; lm_head [V, d] (absent when tied to the embedding).
Symbols: b batch, s sequence length, d hidden_size, L num_layers, h num_heads,
kv num_kv_heads, hd head_dim, f intermediate_size, V vocab_size. All byte counts are exact ints.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

QUANTIZED_SCOPE = ("Linear weights of the decoder blocks (q, k, v, o, gate, up, down) only; "
                   "embeddings, lm_head, norms and biases stay at 16-bit")


def check_positive(name: str, value: Any) -> int:
    """Return `value` if it is a positive int, else raise LowbitError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LowbitError(f"{name}: must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Linear:
    """One projection y = x W^T (+ b), W of shape [out_features, in_features]."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def numel(self) -> int:
        return self.weight_numel + (self.out_features if self.bias else 0)


def block_linears(cfg: ModelConfig) -> list[Linear]:
    """The seven projections of ONE decoder layer, in forward order."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    qkv_bias, o_bias = cfg.attention_bias, cfg.attention_out_bias   # Qwen2: q/k/v biases, bias-free o_proj
    return [
        Linear("q_proj", d, q_out, qkv_bias),
        Linear("k_proj", d, kv_out, qkv_bias),
        Linear("v_proj", d, kv_out, qkv_bias),
        Linear("o_proj", q_out, d, o_bias),
        Linear("gate_proj", d, cfg.intermediate_size, cfg.mlp_bias),
        Linear("up_proj", d, cfg.intermediate_size, cfg.mlp_bias),
        Linear("down_proj", cfg.intermediate_size, d, cfg.mlp_bias),
    ]


def lm_head_linear(cfg: ModelConfig) -> Linear:
    """The vocabulary projection [V, d] (shares storage with the embedding when tied)."""
    return Linear("lm_head", cfg.hidden_size, cfg.vocab_size, False)


ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts by component, summed over all layers. Tied weights are counted once."""

    embeddings: int          # V*d
    attention: int           # L * (q, k, v, o weights + biases)
    mlp: int                 # L * (gate, up, down weights + biases)
    norms: int               # L * 2d (two RMSNorms per layer) + d (final norm)
    lm_head: int             # V*d, or 0 when tied to the embeddings
    block_linear_weights: int  # the quantizable part: L * weights of the 7 projections (no biases)
    block_linear_biases: int

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.lm_head

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count parameters exactly as HF's LlamaForCausalLM would allocate them."""
    L, d = cfg.num_layers, cfg.hidden_size
    lins = block_linears(cfg)
    attn = sum(x.numel for x in lins if x.name in ATTN_NAMES)
    mlp = sum(x.numel for x in lins if x.name not in ATTN_NAMES)
    return ParamCounts(
        embeddings=cfg.vocab_size * d,
        attention=L * attn,
        mlp=L * mlp,
        norms=L * 2 * d + d,
        lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * d,
        block_linear_weights=L * sum(x.weight_numel for x in lins),
        block_linear_biases=L * sum(x.numel - x.weight_numel for x in lins),
    )


def params_total(cfg: ModelConfig) -> int:
    return param_counts(cfg).total


# ---------------------------------------------------------------- weight memory

def weight_memory(cfg: ModelConfig, bits: int, group_size: int = 128, *,
                  symmetric: bool = False, zero_bits: int | None = None) -> dict[str, Any]:
    """Bytes to store the weights at `bits` per weight.

    bits 32 / 16: every parameter at fp32 / fp16 (no quantization).
    bits 1..8:   int-k group quantization of the block Linear weights only (see QUANTIZED_SCOPE).
    Each group of `group_size` consecutive input weights of one output row carries one fp16 scale
    and (unless symmetric) one zero point packed at `zero_bits` (default: `bits`, as GPTQ/AWQ
    checkpoints store them). group_size <= 0 means one group per output row (per-channel).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits in (16, 32) or 1 <= bits <= 8):
        raise LowbitError(f"bits: must be 32, 16 or an integer width 1..8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise LowbitError(f"group_size: must be an integer, got {group_size!r}")
    pc = param_counts(cfg)
    total_params = pc.total
    if bits in (16, 32):
        nbytes = total_params * bits // 8
        return {"bits": bits, "group_size": None, "quantized": "nothing (all parameters at "
                f"{'fp32' if bits == 32 else 'fp16/bf16'})", "quantized_params": 0,
                "unquantized_params": total_params, "quantized_weight_bytes": 0, "scale_bytes": 0,
                "zero_bytes": 0, "unquantized_bytes": nbytes, "total_bytes": nbytes,
                "bits_per_quantized_weight": None, "bits_per_param": float(bits)}

    zb = bits if zero_bits is None else zero_bits
    n_groups = 0
    for lin in block_linears(cfg):
        g = lin.in_features if group_size <= 0 else group_size
        n_groups += lin.out_features * math.ceil(lin.in_features / g)
    n_groups *= cfg.num_layers
    q_params = pc.block_linear_weights
    unq_params = total_params - q_params
    q_bytes = math.ceil(q_params * bits / 8)          # packed k-bit integers
    scale_bytes = n_groups * 2                         # one fp16 scale per group
    zero_bytes = 0 if symmetric else math.ceil(n_groups * zb / 8)
    unq_bytes = unq_params * 2                         # embeddings, lm_head, norms, biases at 16-bit
    total = q_bytes + scale_bytes + zero_bytes + unq_bytes
    return {
        "bits": bits, "group_size": group_size if group_size > 0 else None,
        "quantized": QUANTIZED_SCOPE, "quantized_params": q_params, "unquantized_params": unq_params,
        "quantized_weight_bytes": q_bytes, "scale_bytes": scale_bytes, "zero_bytes": zero_bytes,
        "unquantized_bytes": unq_bytes, "total_bytes": total,
        # effective storage cost of one quantized weight, scales and zeros amortised in
        "bits_per_quantized_weight": (q_bytes + scale_bytes + zero_bytes) * 8 / q_params,
        "bits_per_param": total * 8 / total_params,
    }


def weight_memory_table(cfg: ModelConfig, group_size: int = 128) -> dict[str, dict[str, Any]]:
    """weight_memory at fp32, fp16, int8 and int4 (int-k use `group_size`)."""
    return {name: weight_memory(cfg, bits, group_size)
            for name, bits in (("fp32", 32), ("fp16", 16), ("int8", 8), ("int4", 4))}


# ---------------------------------------------------------------- KV cache

def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_elem: float = 2,
                   scale_bytes: float = 0) -> float:
    """K and V of one token across all layers: 2 * L * kv * (hd * bytes + scale_bytes), scale_bytes being a
    quantized cache's scale per (token, head). The one count of KV bytes: the engine's pools and
    KVQuant call it too."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_elem + 2 * num_layers * num_kv_heads * scale_bytes


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_elem: float = 2) -> float:
    """K and V of one token across all layers: 2 * L * kv * hd * bytes."""
    return kv_token_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, bytes_per_elem)


def kv_cache_bytes(cfg: ModelConfig, batch: int, seqlen: int, bytes_per_elem: float = 2) -> float:
    """KV cache for b sequences of s tokens: 2 * b * s * L * kv * hd * bytes."""
    check_positive("batch", batch)
    check_positive("seqlen", seqlen)
    return batch * seqlen * kv_cache_bytes_per_token(cfg, bytes_per_elem)


def kv_cache_summary(cfg: ModelConfig, batch: int, seqlen: int,
                     bytes_per_elem: float = 2) -> dict[str, Any]:
    """KV cache size, and what grouped-query attention saves vs multi-head (kv = h)."""
    total = kv_cache_bytes(cfg, batch, seqlen, bytes_per_elem)
    # the same model with one K/V head per query head (multi-head attention)
    mha = batch * seqlen * kv_token_bytes(cfg.num_layers, cfg.num_heads, cfg.head_dim, bytes_per_elem)
    return {
        "batch": batch, "seqlen": seqlen, "bytes_per_elem": bytes_per_elem,
        "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
        "bytes": total, "bytes_per_token": kv_cache_bytes_per_token(cfg, bytes_per_elem),
        "mha_bytes": mha, "saving_factor": cfg.num_heads / cfg.num_kv_heads,
        "saved_bytes": mha - total,
    }


# ---------------------------------------------------------------- activations

def activation_memory(cfg: ModelConfig, batch: int, seqlen: int, bytes_per_elem: float = 2,
                      logits_bytes: float = 4) -> dict[str, Any]:
    """Rough activation footprint of an inference forward over b x s tokens (bytes).

    Inference keeps no activations for backward, so only ONE layer's temporaries are live at a
    time; the totals below are what a single layer (or the head) needs on top of weights + KV.
      input_ids          b*s int64 token ids
      residual_stream    b*s*d   hidden state passed between layers (the "input/output" of a layer)
      qkv                b*s*(h + 2kv)*hd   projected queries, keys, values
      attention_scores   b*h*s*s  score matrix; only NAIVE (eager) attention materialises it,
                                 fused kernels (FlashAttention, SDPA) keep it in on-chip tiles
      mlp_inner          b*s*f   ONE SwiGLU inner tensor; gate and up are both live -> x2 in the peak
      logits             b*s*V at `logits_bytes` (HF upcasts logits to fp32); logits_last_token b*V
      layer_peak_*       2*residual + max(attention working set, 2*mlp_inner) for one layer, with
                         naive (scores materialised) or fused attention
      peak_estimate_*    max(layer peak, residual + logits): a back-of-envelope estimate of the
                         forward's peak temporaries, allocator effects ignored.
    """
    check_positive("batch", batch)
    check_positive("seqlen", seqlen)
    b, s, by = batch, seqlen, bytes_per_elem
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    residual = b * s * cfg.hidden_size * by
    qkv = b * s * (h + 2 * kv) * hd * by
    scores = b * h * s * s * by
    attn_out = b * s * h * hd * by
    mlp_inner = b * s * cfg.intermediate_size * by
    logits = b * s * cfg.vocab_size * logits_bytes
    attn_ws_naive = qkv + scores + attn_out
    attn_ws_fused = qkv + attn_out
    layer_naive = 2 * residual + max(attn_ws_naive, 2 * mlp_inner)
    layer_fused = 2 * residual + max(attn_ws_fused, 2 * mlp_inner)
    return {
        "batch": b, "seqlen": s, "bytes_per_elem": by,
        "input_ids": b * s * 8,
        "residual_stream": residual,
        "qkv": qkv,
        "attention_scores": scores,
        "mlp_inner": mlp_inner,
        "logits": logits,
        "logits_last_token": b * cfg.vocab_size * logits_bytes,
        "layer_peak_naive_attention": layer_naive,
        "layer_peak_fused_attention": layer_fused,
        "peak_estimate_naive_attention": max(layer_naive, residual + logits),
        "peak_estimate_fused_attention": max(layer_fused, residual + logits),
        "note": "inference, one layer live at a time; excludes weights and KV cache",
    }
