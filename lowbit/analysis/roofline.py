"""Arithmetic intensity per op and roofline bounds for prefill and decode.

Roofline model: an op moving B bytes to/from DRAM and doing F FLOPs takes at least
max(B / bandwidth, F / peak). Its arithmetic intensity I = F / B (FLOP/byte); the GPU's ridge
point R = peak / bandwidth. I < R -> memory-bound, I >= R -> compute-bound.

Bytes moved per op = weights + input activations + outputs, each read/written once at its
dtype size (perfect on-chip reuse: this is the *minimum* traffic, so times are lower bounds).
For a linear with m tokens (m = b*s in prefill, m = b in decode), in -> out features, all at
2 bytes:  F = 2*m*in*out,  B = 2*(in*out + m*in + m*out)  ->  I ~ m when m << in, out.
So a decode step at b=1 in fp16 sits at ~1 FLOP/byte, hundreds of times under the H100 ridge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowbit.analysis.flops import decode_flops, prefill_flops
from lowbit.analysis.gpus import GPUSpec, get_gpu
from lowbit.analysis.memory import (block_linears, check_positive, kv_cache_bytes, lm_head_linear,
                                    weight_memory)
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class OpCost:
    """FLOPs and minimum DRAM traffic of ONE instance of an op (one layer's q_proj, say)."""

    name: str
    phase: str
    flops: int
    weight_bytes: float   # parameters read
    input_bytes: float    # activations (and K/V cache) read
    output_bytes: float   # results written
    count: int            # instances per forward: L for per-layer ops, 1 for lm_head

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.input_bytes + self.output_bytes

    @property
    def intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.bytes

    def time_bound(self, gpu: GPUSpec, compute: str = "bf16") -> float:
        """Seconds this op needs at least on `gpu` (roofline)."""
        return max(self.bytes / gpu.mem_bandwidth, self.flops / gpu.peak(compute))

    def to_dict(self, gpu: GPUSpec | None = None, compute: str = "bf16") -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "phase": self.phase, "count": self.count,
                             "flops": self.flops, "bytes": self.bytes,
                             "weight_bytes": self.weight_bytes, "input_bytes": self.input_bytes,
                             "output_bytes": self.output_bytes, "intensity": self.intensity}
        if gpu is not None:
            d["bound"] = "compute" if self.intensity >= gpu.ridge_point(compute) else "memory"
            d["time_s"] = self.time_bound(gpu, compute)
        return d


def ridge_point(gpu: str | GPUSpec, compute: str = "bf16") -> float:
    """peak FLOP/s / bandwidth (FLOP/byte)."""
    return get_gpu(gpu).ridge_point(compute)


def linear_cost(name: str, tokens: int, in_f: int, out_f: int, phase: str, *,
                weight_bytes: float = 2, act_bytes: float = 2, count: int = 1) -> OpCost:
    """[tokens, in] x [in, out]^T: F = 2*tokens*in*out; B = W + X + Y."""
    return OpCost(name, phase, 2 * tokens * in_f * out_f, in_f * out_f * weight_bytes,
                  tokens * in_f * act_bytes, tokens * out_f * act_bytes, count)


def op_costs(cfg: ModelConfig, phase: str, batch: int, seqlen: int, *, weight_bytes: float = 2,
             act_bytes: float = 2, kv_bytes: float = 2,
             head_weight_bytes: float | None = None) -> list[OpCost]:
    """Per-op costs of one forward.

    prefill: b sequences of `seqlen` tokens, empty cache, eager-style full s*s attention and
             logits for every position (matches flops.prefill_flops defaults).
    decode:  b sequences, one new token each, attending to `seqlen` keys (the cache, incl. the
             new token; matches flops.decode_flops(context_len=seqlen)).
    weight_bytes: bytes per block-Linear weight (e.g. 0.5 + scale overhead for int4);
    head_weight_bytes: bytes per lm_head weight (default act_bytes: lm_head usually stays 16-bit).
    """
    if phase not in PHASES:
        raise LowbitError(f"phase: must be one of {', '.join(PHASES)}, got {phase!r}")
    b, s = check_positive("batch", batch), check_positive("seqlen", seqlen)
    h, kv, hd, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    q_len = s if phase == "prefill" else 1      # new query positions per sequence
    tokens = b * q_len
    ops = [linear_cost(x.name, tokens, x.in_features, x.out_features, phase,
                       weight_bytes=weight_bytes, act_bytes=act_bytes, count=L)
           for x in block_linears(cfg)]
    # Attention per layer. Q/scores/outputs at act_bytes, K/V (the cache in decode) at kv_bytes.
    # GQA: each K/V head is read once and shared by h/kv query heads -> higher intensity.
    k_bytes = b * kv * s * hd * kv_bytes                    # K (or V): [b, kv, s, hd]
    scores = b * h * q_len * s * act_bytes                  # P: [b, h, q_len, s]
    qo = b * h * q_len * hd * act_bytes                     # Q or attention output: [b, h, q_len, hd]
    pair_flops = 2 * b * h * q_len * s * hd
    ops.append(OpCost("qk^T", phase, pair_flops, 0, qo + k_bytes, scores, L))
    ops.append(OpCost("score*v", phase, pair_flops, 0, scores + k_bytes, qo, L))
    head = lm_head_linear(cfg)
    ops.append(linear_cost("lm_head", tokens, head.in_features, head.out_features, phase,
                           weight_bytes=act_bytes if head_weight_bytes is None else head_weight_bytes,
                           act_bytes=act_bytes, count=1))
    return ops


def op_table(cfg: ModelConfig, phase: str, batch: int, seqlen: int, gpu: str | GPUSpec | None = None,
             compute: str = "bf16", **byte_sizes: float) -> list[dict[str, Any]]:
    """op_costs as dicts, with memory/compute classification when a GPU is given."""
    spec = None if gpu is None else get_gpu(gpu)
    return [op.to_dict(spec, compute) for op in op_costs(cfg, phase, batch, seqlen, **byte_sizes)]


def _weights_read(cfg: ModelConfig, weight_bits: int, group_size: int) -> float:
    """Weight bytes streamed from DRAM per forward. An untied embedding table is only gathered
    (b*s rows), so it is left out; a tied one is read in full as the lm_head."""
    wm = weight_memory(cfg, weight_bits, group_size)
    emb_elem = 4 if weight_bits == 32 else 2               # embeddings never quantized here
    skip = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * emb_elem
    return wm["total_bytes"] - skip


def _bound(flops: float, nbytes: float, gpu: GPUSpec, compute: str) -> dict[str, Any]:
    t_mem, t_comp = nbytes / gpu.mem_bandwidth, flops / gpu.peak(compute)
    return {"flops": flops, "bytes": nbytes, "intensity": flops / nbytes,
            "ridge_point": gpu.ridge_point(compute), "t_memory_s": t_mem, "t_compute_s": t_comp,
            "time_s": max(t_mem, t_comp), "bound": "memory" if t_mem >= t_comp else "compute"}


def decode_bound(cfg: ModelConfig, gpu: str | GPUSpec, batch: int = 1, context_len: int = 2048, *,
                 weight_bits: int = 16, group_size: int = 128, kv_bytes: float = 2,
                 compute: str = "bf16") -> dict[str, Any]:
    """Upper bound on decode throughput: b / max(bytes/bandwidth, flops/peak) tokens/s.

    bytes per step = weights streamed once (shared by the batch) + the KV cache read for
    b sequences of `context_len` tokens. Weight-only quantization still multiplies in bf16, so
    `compute` stays bf16 unless the kernels really run int8/fp8 math.
    """
    spec = get_gpu(gpu)
    b, t = check_positive("batch", batch), check_positive("context_len", context_len)
    w = _weights_read(cfg, weight_bits, group_size)
    kv = kv_cache_bytes(cfg, b, t, kv_bytes)
    out = _bound(decode_flops(cfg, t, b).total, w + kv, spec, compute)
    out.update({"gpu": spec.name, "batch": b, "context_len": t, "weight_bytes_read": w,
                "kv_bytes_read": kv, "tokens_per_s": b / out["time_s"],
                "tokens_per_s_per_sequence": 1 / out["time_s"],
                "fits_in_memory": weight_memory(cfg, weight_bits, group_size)["total_bytes"] + kv
                <= spec.memory_bytes})
    return out


def prefill_bound(cfg: ModelConfig, gpu: str | GPUSpec, batch: int = 1, seqlen: int = 2048, *,
                  weight_bits: int = 16, group_size: int = 128, kv_bytes: float = 2,
                  compute: str = "bf16") -> dict[str, Any]:
    """Lower bound on the time to prefill b prompts of `seqlen` tokens (time to first token).

    FLOPs: causal attention (masked blocks skipped, as FlashAttention does) and last-position
    logits only -- the least work a server must do. Bytes: weights once + the KV cache written;
    intermediates are assumed to stay on chip. Both choices make this a true lower bound.
    """
    spec = get_gpu(gpu)
    b, s = check_positive("batch", batch), check_positive("seqlen", seqlen)
    fl = prefill_flops(cfg, s, b, causal=True, all_logits=False).total
    w = _weights_read(cfg, weight_bits, group_size)
    kv = kv_cache_bytes(cfg, b, s, kv_bytes)
    out = _bound(fl, w + kv, spec, compute)
    out.update({"gpu": spec.name, "batch": b, "seqlen": s, "weight_bytes_read": w,
                "kv_bytes_written": kv, "tokens_per_s": b * s / out["time_s"]})
    return out
