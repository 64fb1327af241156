"""Configuration dataclasses shared across lowbit."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

# HF `model_type` values our Llama-family decoder runs unchanged.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "smollm2")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (HF config.json names in comments)."""

    arch: str = "llama"                 # model_type
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
    attention_out_bias: bool = False    # o_proj bias (Llama's attention_bias covers it, Qwen2's does not)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim <= 0:
            if self.hidden_size % self.num_heads:
                raise LowbitError(
                    f"config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise LowbitError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "") -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        arch = cfg.get("model_type", "llama")
        if arch not in LLAMA_FAMILY:
            raise LowbitError(
                f"{name or 'config'}: unsupported architecture model_type={arch!r} "
                f"(supported: {', '.join(LLAMA_FAMILY)})")
        # transformers >= 5 writes rope settings as `rope_parameters` (theta inside), older as rope_scaling.
        rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        qkv_bias = cfg.get("attention_bias", arch == "qwen2")  # Qwen2 has q/k/v biases without saying so
        try:
            n_heads = cfg["num_attention_heads"]
            return cls(
                arch=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=n_heads,
                num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or 0,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=rope or None,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=qkv_bias,
                attention_out_bias=qkv_bias and arch != "qwen2",
                mlp_bias=cfg.get("mlp_bias", False),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                name=name,
            )
        except KeyError as e:
            raise LowbitError(f"{name or 'config'}: missing required key {e.args[0]!r}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"{path}: config file not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf(cfg, name=str(path.parent.name if path.name == "config.json" else path.stem))

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers expects for this architecture."""
        d = {
            "model_type": "llama" if self.arch == "smollm2" else self.arch,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}.get(self.arch, "LlamaForCausalLM")],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
