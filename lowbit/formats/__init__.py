"""Checkpoint formats other tools read: compressed-tensors (llm-compressor, vLLM, SGLang, transformers),
the hub's GPTQ (gptqmodel / auto-gptq) and AWQ GEMM (autoawq) layouts.

Each format is a module with two functions over whole models, registered in FORMATS:

  export(model) -> (quantization_config, tensors)
      quantization_config: the dict for config.json's "quantization_config";
      tensors: full dotted name -> tensor for every quantized Linear of `model` (the format's names,
      layouts and dtypes; bias included). Refuses (LowbitError, one line naming the option and the formats
      that can hold it) any layer the format cannot express.
  import_layers(quantization_config, sd, where) -> {dotted module name: lowbit quantized layer}
      Pops the format's tensors out of `sd` (HF names) and builds lowbit's own quantized layers from them
      (codes and scales as stored: no dequantized copy). `where` names the file in errors.

The directory writing (config.json, model.safetensors, tokenizer) is lowbit.models.checkpoint's; reading is
lowbit.models.loader's, which picks the format by quantization_config.quant_method.
"""
from __future__ import annotations

import importlib

from lowbit.errors import LowbitError

# --format name -> (module, quant_method written in config.json)
FORMATS = {
    "compressed-tensors": ("lowbit.formats.compressed_tensors", "compressed-tensors"),
    "gptq": ("lowbit.formats.gptq", "gptq"),
    "awq": ("lowbit.formats.awq", "awq"),
}


# which registered methods' layers each format can hold (the rest is refused before any work is done)
HOLDS = {
    "compressed-tensors": {"rtn", "gptq", "awq", "w8a8", "smoothquant", "fp8"},
    "gptq": {"rtn", "gptq", "awq"},
    "awq": {"rtn", "gptq", "awq"},
}


def check_method(format: str, method: str) -> None:
    """Refuse, before quantizing, a method whose layers `format` cannot hold (one line naming both)."""
    if format == "lowbit" or method in HOLDS.get(format, set()):
        return
    if format not in FORMATS:
        raise LowbitError(f"--format: expected one of lowbit, {', '.join(FORMATS)}, got {format!r}")
    can = [f for f, ms in HOLDS.items() if method in ms]
    raise LowbitError(f"--format {format} cannot hold --method {method} layers ({', '.join(sorted(HOLDS[format]))} "
                      f"only); use --format {' or '.join(can + ['lowbit'])}")


def preflight(format: str, cfg, in_features: set[int]) -> None:
    """Refuse, before quantizing, method options `format` cannot hold: `cfg` is the method's config (its
    group_size, zero_point, act_order, static_groups where it has them), in_features the block Linears' widths.
    The export itself checks every layer again; this only saves the user the wait."""
    if format == "lowbit":
        return
    gs = getattr(cfg, "group_size", None)
    if isinstance(gs, int) and gs > 0:
        bad = sorted(n for n in in_features if n % gs)
        if bad:
            raise LowbitError(f"--format {format}: in_features={bad[0]} is not a multiple of --group-size {gs} "
                              f"(lowbit's short last group), which {format} cannot hold; use a group size that "
                              f"divides every width (e.g. {divisor_hint(in_features)}) or --format lowbit")
    if getattr(cfg, "zero_point", "int") == "float" and not getattr(cfg, "sym", False):
        raise LowbitError(f"--format {format}: --zero-point float (a real-valued zero offset) is not in the "
                          f"format; use --zero-point int or --format lowbit")
    if format == "compressed-tensors" and getattr(cfg, "act_order", False) and not getattr(cfg, "static_groups", True):
        raise LowbitError("--format compressed-tensors: --act-order without --static-groups needs g_idx, which "
                          "compressed-tensors no longer stores; add --static-groups, or use --format gptq or lowbit")
    if format == "awq" and getattr(cfg, "bits", 4) != 4:
        raise LowbitError(f"--format awq: --bits {cfg.bits} (AWQ's GEMM format holds 4 bits only); use "
                          f"--format gptq, compressed-tensors or lowbit")


def divisor_hint(widths: set[int]) -> str:
    """A group size dividing every width, for error messages."""
    return next((str(g) for g in (128, 64, 32) if all(n % g == 0 for n in widths)), "-1 (per channel)")


def get_format(name: str):
    """The module of format `name` (a key of FORMATS)."""
    if name not in FORMATS:
        raise LowbitError(f"--format: expected one of lowbit, {', '.join(FORMATS)}, got {name!r}")
    return importlib.import_module(FORMATS[name][0])


def format_of_quant_method(quant_method) -> str | None:
    """The FORMATS key whose config.json quant_method is `quant_method`, or None."""
    return next((k for k, (_, qm) in FORMATS.items() if qm == quant_method), None)
