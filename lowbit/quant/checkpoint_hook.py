"""Where `lowbit.load` asks whether a path is a quantized checkpoint."""
from __future__ import annotations

from pathlib import Path


def load_quantized_if_any(path: Path, dtype, device, tokenizer):
    """(model, tokenizer) when `path` is a lowbit quantized directory, else None."""
    from lowbit.quant.checkpoint import is_quantized_dir, load_quantized
    return load_quantized(path, dtype, device, tokenizer) if is_quantized_dir(path) else None
