"""Named model shapes and random-initialised models at those shapes (GPU speed benchmarks and tests).

Random weights are normal with std 1/sqrt(fan_in) (norms at 1): activations keep a realistic scale
through the blocks, and nothing is zero, so no kernel can skip work a real model would make it do.
"""
from __future__ import annotations

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

SHAPES: dict[str, dict] = {  # name -> ModelConfig fields
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
}


def shape_config(shape: str | ModelConfig, **overrides) -> ModelConfig:
    """A named shape (or a config) with fields overridden, e.g. num_layers=1 for one block."""
    if isinstance(shape, ModelConfig):
        kw = {k: getattr(shape, k) for k in shape.__dataclass_fields__}
    elif shape in SHAPES:
        kw = dict(SHAPES[shape], name=shape)
    else:
        raise LowbitError(f"unknown model shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    kw.update(overrides)
    return ModelConfig(**kw)


@torch.no_grad()
def random_llama(shape: str | ModelConfig, dtype=torch.bfloat16, device="cpu", seed: int = 0, **overrides):
    """LlamaForCausalLM at `shape`, weights drawn on `device` directly (8B shapes never touch the CPU)."""
    from lowbit.models.llama import LlamaForCausalLM
    cfg = shape_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, p.shape[-1] ** -0.5)
        else:
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.init_rope(device)
    return model.eval()
