"""lowbit's quantized checkpoint format: a directory of safetensors + config.json + a versioned quantization config.

    OUT/config.json               the model's HF-style config (plus "quantization_config" for reference)
    OUT/quantization_config.json  format version, method and options, calibration, per-module layer configs
    OUT/model.safetensors         every tensor, quantized ones packed; the others in --save-dtype (fp16)
    OUT/quant_report.json         per-layer errors and bytes from the layer walk
    OUT/tokenizer*                the tokenizer

With format="compressed-tensors" | "gptq" | "awq" (lowbit.formats) the directory is instead the one those
tools write: config.json with their quantization_config, their tensor names and packings in
model.safetensors, the tokenizer, and lowbit's quant_report.json beside them (a file the others ignore).

Written into a temporary sibling directory and renamed into place, so an interrupted run never leaves a
directory that looks complete. Read back by `lowbit.models.loader.load`, through the same `build_model`
as every other checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError
from lowbit.files import field, read_json
from lowbit.models.arch import config_to_hf

FORMAT = "lowbit"
FORMAT_VERSION = 1
QCONFIG = "quantization_config.json"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def quantized_modules(model) -> dict[str, dict[str, Any]]:
    """Dotted name -> layer_config() of every quantized layer in the model."""
    return {n: m.layer_config() for n, m in model.named_modules() if hasattr(m, "layer_config")}


def _tensors(model, save_dtype: torch.dtype | None, skip_quantized: bool = False) -> dict[str, torch.Tensor]:
    """The state dict to store: quantized layers' tensors as they are (packed codes, their scales' dtype),
    every other float tensor (embeddings, norms, an untied head) in `save_dtype` (None: as they are).
    skip_quantized: leave the quantized layers out (a foreign format writes them its own way)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors stores a shared tensor once: it is the embedding
    quantized = tuple(f"{n}." for n in quantized_modules(model))
    out = {}
    for k, v in sd.items():
        v = v.detach()
        if k.startswith(quantized):
            if skip_quantized:
                continue
        elif save_dtype is not None and v.is_floating_point():
            v = v.to(save_dtype)
        out[k] = v.contiguous().cpu()
    return out


def save_quantized(model, tokenizer, out: str | Path, method: dict, calibration: dict | None,
                   report: dict | None = None, overwrite: bool = False, kv_cache: str | None = None,
                   save_dtype: str | None = "fp16", format: str = FORMAT) -> Path:
    """Write the quantized `model` to directory `out` atomically. save_dtype: fp16 | bf16 | fp32 for the
    tensors no method quantized, or None to keep the model's (an exact copy, e.g. a cache of a run).
    format: "lowbit" or a lowbit.formats name (compressed-tensors, gptq, awq)."""
    from safetensors.torch import save_file

    from lowbit import __version__

    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"-o {out}: already exists (pass --force to replace it)")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise LowbitError(f"--save-dtype: expected one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    if format != FORMAT:
        return _save_foreign(model, tokenizer, out, method, report, kv_cache, save_dtype, format)
    qcfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
            "method": method, "calibration": calibration, "dtype": str(model.dtype).removeprefix("torch."),
            "save_dtype": save_dtype or str(model.dtype).removeprefix("torch."), "kv_cache": kv_cache, "modules": quantized_modules(model)}
    with atomic_dir(out) as tmp:
        hf = config_to_hf(model.config)
        hf["quantization_config"] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION,
                                     "method": method.get("method")}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / QCONFIG).write_text(json.dumps(qcfg, indent=2))
        if report is not None:
            (tmp / "quant_report.json").write_text(json.dumps(report, indent=2))
        save_file(_tensors(model, SAVE_DTYPES.get(save_dtype)), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def _save_foreign(model, tokenizer, out: Path, method: dict, report: dict | None, kv_cache: str | None,
                  save_dtype: str | None, format: str) -> Path:
    """The directory compressed-tensors / GPTQ / AWQ tools write (see lowbit.formats)."""
    from safetensors.torch import save_file

    from lowbit.formats import get_format

    fmt = get_format(format)
    kv_before = model.kv_quant
    if kv_cache and kv_before is None:   # the format judges the KV setting from the model: show it, then restore
        from lowbit.layers.kv_quant import KVQuant
        model.set_kv_quant(KVQuant(kv_cache))
    try:
        qc, qtensors = fmt.export(model, method)    # refusals happen here, before anything is written
    finally:
        model.set_kv_quant(kv_before)
    tensors = {**_tensors(model, SAVE_DTYPES.get(save_dtype), skip_quantized=True), **qtensors}
    dtype = save_dtype or str(model.dtype).removeprefix("torch.")
    with atomic_dir(out) as tmp:
        hf = config_to_hf(model.config)
        hf["dtype"] = hf["torch_dtype"] = str(SAVE_DTYPES.get(dtype, model.dtype)).removeprefix("torch.")
        hf["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if report is not None:
            (tmp / "quant_report.json").write_text(json.dumps({"method": method, **report}, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / QCONFIG).exists()


def read_qconfig(path: Path) -> dict[str, Any]:
    """The directory's quantization config, checked field by field (layer configs are checked by build_layer)."""
    f = path / QCONFIG
    q = read_json(f, "quantization config")
    where = str(f)
    if q.get("format") != FORMAT:
        raise LowbitError(f"{where}: field 'format' must be {FORMAT!r}, got {q.get('format')!r}")
    version = field(q, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise LowbitError(f"{where}: format_version {version} is newer than this lowbit reads "
                          f"({FORMAT_VERSION}); upgrade lowbit")
    modules = field(q, "modules", dict, where)
    for name, cfg in modules.items():
        if not isinstance(cfg, dict):
            raise LowbitError(f"{where}: modules[{name!r}] must be an object, got {type(cfg).__name__}")
    kv = field(q, "kv_cache", (str, type(None)), where, None)
    if kv not in (None, "int8", "fp8"):
        raise LowbitError(f"{where}: field 'kv_cache' must be int8, fp8 or null, got {kv!r}")
    return q
