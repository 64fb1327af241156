"""Per-architecture name tables: where the Linears of a decoder block are and what feeds them.

Quantizers walk blocks through these tables instead of matching class names.
"""
from __future__ import annotations

from dataclasses import dataclass


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


LLAMA = BlockLayout(
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

LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "smollm2": LLAMA}


def layout_of(model) -> BlockLayout:
    from lowbit.errors import LowbitError
    arch = model.config.arch
    if arch not in LAYOUTS:
        raise LowbitError(f"model: no block layout for architecture {arch!r}")
    return LAYOUTS[arch]
