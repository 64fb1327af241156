"""lowbit: make LLM inference cheaper, and show why."""
from __future__ import annotations

__version__ = "0.1.0"

from lowbit.config import ModelConfig, SamplingParams  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402


def load(path=None, dtype="fp32", device="cpu", tokenizer=True):
    """Load a model (HF dir, GGUF file, quantized lowbit dir; None = default) -> (model, tokenizer)."""
    from lowbit.models.loader import load as _load
    return _load(path, dtype=dtype, device=device, tokenizer=tokenizer)


__all__ = ["ModelConfig", "SamplingParams", "LowbitError", "load", "__version__"]
