"""lowbit: make LLM inference cheaper, and show why.

    from lowbit import LLM, SamplingParams, load, quantize

    model, tok = load()                                   # the default SmolLM2-135M-Instruct (or a path)
    result = quantize(model, "rtn", bits=4, group_size=128)
    result.save(model, tok, "out/smollm2-w4g128")         # lowbit.load("out/smollm2-w4g128") reads it back
    outs = LLM("out/smollm2-w4g128").generate(["The capital of France is"], SamplingParams(max_tokens=8))

The names below are imported on first use, so `import lowbit` stays light (no engine, no methods).
"""
from __future__ import annotations

__version__ = "0.1.0"

from lowbit.config import ModelConfig, SamplingParams  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402

# public name -> (module, attribute), resolved lazily by __getattr__
_LAZY = {
    "load": ("lowbit.models.loader", "load"),
    "quantize": ("lowbit.quant.api", "quantize"),
    "calibration_windows": ("lowbit.quant.api", "calibration_windows"),
    "LLM": ("lowbit.engine.llm", "LLM"),
    "Engine": ("lowbit.engine.llm", "Engine"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ModelConfig", "SamplingParams", "LowbitError", "load", "quantize", "calibration_windows", "LLM",
           "Engine", "__version__"]
