"""Quantized checkpoints: a directory of safetensors + config.json + a versioned quantization config.

    OUT/config.json               the model's HF-style config (plus "quantization_config" for reference)
    OUT/quantization_config.json  format version, method and options, calibration, per-module layer configs
    OUT/model.safetensors         every tensor, quantized ones packed
    OUT/quant_report.json         per-layer errors and bytes from the layer walk
    OUT/tokenizer*                the tokenizer

Written into a temporary sibling directory and renamed into place, so an interrupted run never leaves a
directory that looks complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowbit.atomic import atomic_dir
from lowbit.errors import LowbitError

FORMAT = "lowbit"
FORMAT_VERSION = 1
QCONFIG = "quantization_config.json"


def quantized_modules(model) -> dict[str, dict[str, Any]]:
    """Dotted name -> layer_config() of every quantized layer in the model."""
    return {n: m.layer_config() for n, m in model.named_modules() if hasattr(m, "layer_config")}


def _tensors(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors stores a shared tensor once: it is the embedding
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_quantized(model, tokenizer, out: str | Path, method: dict, calibration: dict | None,
                   report: dict | None = None, overwrite: bool = False, kv_cache: str | None = None) -> Path:
    """Write the quantized `model` to directory `out` atomically."""
    from safetensors.torch import save_file

    from lowbit import __version__

    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"-o {out}: already exists (pass --force to replace it)")
    qcfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
            "method": method, "calibration": calibration, "dtype": str(model.dtype).removeprefix("torch."),
            "kv_cache": kv_cache,
            "modules": quantized_modules(model)}
    with atomic_dir(out) as tmp:
        hf = model.config.to_hf()
        hf["quantization_config"] = {"quant_method": FORMAT, "format_version": FORMAT_VERSION,
                                     "method": method.get("method")}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / QCONFIG).write_text(json.dumps(qcfg, indent=2))
        if report is not None:
            (tmp / "quant_report.json").write_text(json.dumps(report, indent=2))
        save_file(_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / QCONFIG).is_file()


def read_qconfig(path: Path) -> dict[str, Any]:
    f = path / QCONFIG
    try:
        q = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(q, dict) or q.get("format") != FORMAT or not isinstance(q.get("modules"), dict):
        raise LowbitError(f"{f}: not a lowbit quantization config (needs format={FORMAT!r} and modules)")
    if int(q.get("format_version", 0)) > FORMAT_VERSION:
        raise LowbitError(f"{f}: format_version {q['format_version']} is newer than this lowbit reads "
                          f"({FORMAT_VERSION}); upgrade lowbit")
    return q


def load_quantized(path: Path, dtype: torch.dtype, device: str, tokenizer: bool = True):
    """(model with quantized layers, tokenizer) from a directory written by `save_quantized`."""
    from lowbit.config import ModelConfig
    from lowbit.models import hf_loader
    from lowbit.models.llama import LlamaForCausalLM
    from lowbit.quant.layers import build_layer, swap_linear

    qcfg = read_qconfig(path)
    cfg = ModelConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for name, layer_cfg in qcfg["modules"].items():
        try:
            swap_linear(model, name, build_layer(layer_cfg, device="meta"))
        except LowbitError as e:
            raise LowbitError(f"{path / QCONFIG}: module {name}: {e}") from None
    sd = hf_loader.read_safetensors([path / "model.safetensors"]) if (path / "model.safetensors").is_file() \
        else None
    if sd is None:
        raise LowbitError(f"{path}: model.safetensors is missing")
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
        raise LowbitError(f"{path / 'model.safetensors'}: {what} (checkpoint and its quantization config disagree)")
    quantized = tuple(f"{n}." for n in qcfg["modules"])
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise LowbitError(f"{path / 'model.safetensors'}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                              f"expected {tuple(t.shape)}")
        if sd[k].dtype != t.dtype and k.startswith(quantized) and not t.is_floating_point():
            raise LowbitError(f"{path / 'model.safetensors'}: tensor {k!r} is {sd[k].dtype}, expected {t.dtype}")
        # Float tensors outside the quantized layers follow the requested dtype; packed codes stay as stored.
        if not k.startswith(quantized) and sd[k].is_floating_point():
            sd[k] = sd[k].to(dtype)
        sd[k] = sd[k].to(device)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    model.quantization_config = qcfg
    model.source = str(path)
    tok = hf_loader.hf_tokenizer(path) if tokenizer else None
    return model.eval(), tok
