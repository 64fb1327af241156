"""Configuration dataclasses shared across lowbit."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lowbit.errors import LowbitError

# Upper bounds well above any real model (Llama-3-405B: d 16384, 126 layers, 128 heads, vocab 128k; Gemma-3:
# vocab 262k, head_dim 256; contexts of 10M tokens): a value past them is a corrupt file, not a model.
_INT_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 19,
               "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "max_position_embeddings": 1 << 27}
_MAX_HEAD_DIM = 1024
_ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn")


def _check_int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise LowbitError(f"config: {name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise LowbitError(f"config: {name} = {v} is outside the plausible range [{lo}, {hi}]")
    return v


def _check_float(name: str, v: Any, lo: float, hi: float) -> float:
    """A finite number in (lo, hi], as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
        raise LowbitError(f"config: {name} must be a finite number in ({lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _check_rope_scaling(r: Any) -> dict[str, Any] | None:
    if r is None:
        return None
    if not isinstance(r, dict):
        raise LowbitError(f"config: rope_scaling must be an object or null, got {type(r).__name__}")
    kind = r.get("rope_type", r.get("type"))
    if kind not in _ROPE_TYPES:
        raise LowbitError(f"config: rope_scaling type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if kind != "dynamic" or "factor" in r:
        _check_float("rope_scaling.factor", r.get("factor"), 0.0, 1e4)
    for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
        if r.get(k) is not None:
            _check_float(f"rope_scaling.{k}", r[k], 0.0, 1e6)
    if kind == "llama3" and (r.get("low_freq_factor") or 1.0) >= (r.get("high_freq_factor") or 4.0):
        raise LowbitError("config: rope_scaling.low_freq_factor must be below high_freq_factor")
    if r.get("original_max_position_embeddings") is not None:
        _check_int("rope_scaling.original_max_position_embeddings", r["original_max_position_embeddings"], 1,
                   _INT_LIMITS["max_position_embeddings"])
    return r


def rename_fields(message: str, names: dict[str, str]) -> str:
    """A ModelConfig error message with its field names as a file spells them (num_layers ->
    num_hidden_layers in config.json, llama.block_count in GGUF metadata)."""
    pattern = r"\b(" + "|".join(map(re.escape, names)) + r")\b"
    return re.sub(pattern, lambda m: names[m.group(1)], message)


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (HF config.json names in comments)."""

    arch: str = "llama"                 # architecture record (lowbit.models.arch), e.g. llama, qwen2
    vocab_size: int = 32000
    hidden_size: int = 4096             # d
    intermediate_size: int = 11008      # SwiGLU inner width
    num_layers: int = 32                # num_hidden_layers
    num_heads: int = 32                 # num_attention_heads
    num_kv_heads: int = 32              # num_key_value_heads (GQA when < num_heads)
    head_dim: int = 0                   # 0 -> hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # q/k/v biases (Qwen2; Llama's attention_bias)
    attention_out_bias: bool | None = None  # o_proj bias; None: as attention_bias (Llama's rule; Qwen2's
                                            # record sets False)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Types, ranges and plausibility of every field, before anything is built from them: a corrupt
        config (2^32 layers, a NaN epsilon, heads that do not divide the width) is an error here."""
        if not isinstance(self.arch, str) or not self.arch:
            raise LowbitError(f"config: arch must be a non-empty string, got {self.arch!r}")
        for f, hi in _INT_LIMITS.items():
            _check_int(f, getattr(self, f), 1, hi)
        _check_int("head_dim", self.head_dim, 0, _MAX_HEAD_DIM)
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            raise LowbitError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise LowbitError(
                    f"config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
            _check_int("head_dim", self.head_dim, 1, _MAX_HEAD_DIM)
        if self.head_dim % 2:
            raise LowbitError(f"config: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        self.rms_norm_eps = _check_float("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
        self.rope_theta = _check_float("rope_theta", self.rope_theta, 0.0, 1e12)
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        for f in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias"):
            if not isinstance(getattr(self, f), bool):
                raise LowbitError(f"config: {f} must be true or false, got {getattr(self, f)!r}")
        if self.bos_token_id is not None:
            _check_int("bos_token_id", self.bos_token_id, 0, 2**31 - 1)
        eos = self.eos_token_id
        for e in ([] if eos is None else eos if isinstance(eos, list) else [eos]):
            _check_int("eos_token_id", e, 0, 2**31 - 1)
        if not isinstance(self.name, str):
            raise LowbitError(f"config: name must be a string, got {self.name!r}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_LOGPROBS = 20   # top alternatives per token at most (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop (vLLM's names)."""

    temperature: float = 1.0        # 0 -> greedy
    top_k: int = 0                  # 0 -> off
    top_p: float = 1.0              # 1 -> off
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1                      # completions per prompt (they share the prompt's KV blocks)
    logprobs: int | None = None     # None: off; k >= 0: each token's log-probability and the k most likely

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise LowbitError(f"n: must be an integer >= 1, got {self.n!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise LowbitError(f"stop: expected a string or a list of strings, got {self.stop!r}")
        if self.max_tokens <= 0:
            raise LowbitError(f"max_tokens: must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise LowbitError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LowbitError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LowbitError(f"top_k: must be >= 0, got {self.top_k}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise LowbitError(f"logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
