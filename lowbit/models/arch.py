"""Architecture records: everything lowbit knows about one model family, in one place per family.

A record says which HF `model_type`s and GGUF `general.architecture` it reads, how their config maps onto
`ModelConfig` (and back), the GGUF tensor names and llama.cpp's q/k row permutation, the decoder block's
layout (its Linears, what feeds them, the residual stages), and the modules that methods treat specially.
Loaders, the layer walk and the methods ask the record (`arch_of(cfg)`, or `model.arch`); none of them
matches module-name substrings. Records are registered like the methods: `register_arch(Arch(...))`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class BlockLayout:
    blocks: str                                  # the ModuleList of decoder blocks
    linears: tuple[str, ...]                     # every Linear of a block, in execution order
    # (producer, consumers): the consumers read the producer's output as their input, so a per-input-channel
    # scale can be folded into the producer (a norm's weight or a Linear's rows) — AWQ and SmoothQuant.
    input_groups: tuple[tuple[str, tuple[str, ...]], ...]
    # "true sequential" order: Linears quantized together, each group seeing the already-quantized ones.
    sequential: tuple[tuple[str, ...], ...]
    # The block as residual stages x -> x + f(x), run in order: (block method taking (x, cos, sin), the
    # stage's output Linear, which produces f(x)). A true-sequential walk runs one stage at a time.
    stages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Arch:
    """One architecture family. Names of Linears are relative to a decoder block (`self_attn.q_proj`)."""

    name: str                                    # registry key and ModelConfig.arch
    model_types: tuple[str, ...]                 # HF config.json `model_type` values read as this family
    hf_class: str                                # config.json `architectures[0]` written back
    layout: BlockLayout
    attention: tuple[str, ...]                   # the attention projections (ZeroQuant's attn_bits applies)
    no_clip: tuple[str, ...]                     # AWQ: no clip search (their error acts through q·k softmax)
    norms: tuple[str, ...]                       # a block's norm modules (LKD trains their weights)
    gguf_arch: str | None = None                 # GGUF general.architecture
    gguf_names: dict[str, str] = field(default_factory=dict)   # GGUF name ({i} = block) -> HF name
    gguf_qk_permuted: bool = False               # llama.cpp permuted q/k rows for its interleaved RoPE
    gguf_skip: tuple[str, ...] = ()              # GGUF tensors recomputed from the config, not loaded
    # config.json -> (attention_bias for q/k/v, attention_out_bias for o_proj)
    biases: Callable[[dict[str, Any]], tuple[bool, bool]] = lambda d: (bool(d.get("attention_bias", False)),) * 2

    def config_from_hf(self, d: dict[str, Any], name: str = "") -> ModelConfig:
        """ModelConfig from an HF config.json dict of this family (validated by ModelConfig)."""
        where = "config"
        # transformers >= 5 writes rope settings as `rope_parameters` (theta inside), older as rope_scaling.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise LowbitError(f"{where}: field 'rope_scaling' must be an object, got {type(rope).__name__}")
        rope = dict(rope)
        theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        qkv_bias, o_bias = self.biases(d)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise LowbitError(f"{where}: missing required key {missing[0]!r}")
        n_heads = d["num_attention_heads"]
        return ModelConfig(
            arch=self.name, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads, head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope or None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False), attention_bias=qkv_bias,
            attention_out_bias=o_bias, mlp_bias=d.get("mlp_bias", False), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), name=name)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The config.json dict transformers expects for this architecture."""
        return {
            "model_type": self.model_types[0], "architectures": [self.hf_class],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias, "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        }

    def gguf_to_hf(self, gguf_name: str) -> str | None:
        """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
        parts = gguf_name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            key = ".".join(["blk", "{i}", *parts[2:]])
            return self.gguf_names[key].format(i=parts[1]) if key in self.gguf_names else None
        return self.gguf_names.get(gguf_name)

    def is_attention(self, name: str) -> bool:
        """Whether a block Linear (`self_attn.q_proj`, or its full dotted name) is an attention projection."""
        return any(name == a or name.endswith("." + a) for a in self.attention)

    def clips(self, name: str) -> bool:
        """Whether AWQ's clip search applies to this block Linear."""
        return not any(name == a or name.endswith("." + a) for a in self.no_clip)


ARCHS: dict[str, Arch] = {}


def register_arch(arch: Arch) -> Arch:
    ARCHS[arch.name] = arch
    return arch


def arch_for_model_type(model_type: Any, where: str = "config") -> Arch:
    """The record reading HF `model_type`, or a one-line error listing the supported ones."""
    for a in ARCHS.values():
        if model_type in a.model_types:
            return a
    supported = ", ".join(t for a in ARCHS.values() for t in a.model_types)
    raise LowbitError(f"{where}: unsupported architecture model_type={model_type!r} (supported: {supported})")


def arch_for_gguf(gguf_arch: Any, where: str) -> Arch:
    for a in ARCHS.values():
        if a.gguf_arch is not None and gguf_arch == a.gguf_arch:
            return a
    supported = ", ".join(a.gguf_arch for a in ARCHS.values() if a.gguf_arch)
    raise LowbitError(f"{where}: unsupported architecture {gguf_arch!r} (supported: {supported})")


def arch_of(cfg: ModelConfig) -> Arch:
    """The record of a config (ModelConfig.arch is a record name)."""
    if cfg.arch not in ARCHS:
        raise LowbitError(f"model: no architecture record for {cfg.arch!r} (known: {', '.join(ARCHS)})")
    return ARCHS[cfg.arch]


def config_from_hf(d: Any, name: str = "", where: str = "config") -> ModelConfig:
    """ModelConfig from any supported HF config.json dict; errors name `where` (the file) and the field."""
    if not isinstance(d, dict):
        raise LowbitError(f"{where}: expected a JSON object, got {type(d).__name__}")
    arch = arch_for_model_type(d.get("model_type", "llama"), where)
    try:
        return arch.config_from_hf(d, name)
    except LowbitError as e:
        raise LowbitError(f"{where}: {str(e).removeprefix('config: ')}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return arch_of(cfg).config_to_hf(cfg)


# ----------------------------------------------------------------------------- the Llama family

_LLAMA_LAYOUT = BlockLayout(
    blocks="model.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    input_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    stages=(("attn_residual", "self_attn.o_proj"), ("mlp_residual", "mlp.down_proj")),
)

_LLAMA_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_LLAMA_COMMON = dict(
    layout=_LLAMA_LAYOUT,
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    gguf_names=_LLAMA_GGUF_NAMES,
    gguf_skip=("rope_freqs",),     # llama3 rope factors are recomputed from the config
)

LLAMA = register_arch(Arch(name="llama", model_types=("llama", "smollm2"), hf_class="LlamaForCausalLM",
                           gguf_arch="llama", gguf_qk_permuted=True, **_LLAMA_COMMON))
MISTRAL = register_arch(Arch(name="mistral", model_types=("mistral",), hf_class="MistralForCausalLM",
                             gguf_arch="mistral", gguf_qk_permuted=True, **_LLAMA_COMMON))
# Qwen2 has q/k/v biases without saying so in its config, and never an o_proj bias; its GGUF q/k rows
# are stored as in HF (llama.cpp's converter permutes only for the llama-style RoPE).
QWEN2 = register_arch(Arch(name="qwen2", model_types=("qwen2",), hf_class="Qwen2ForCausalLM",
                           gguf_arch="qwen2", gguf_qk_permuted=False,
                           biases=lambda d: (bool(d.get("attention_bias", True)), False), **_LLAMA_COMMON))
