"""Read a Hugging Face model directory: config.json, safetensors shard(s), tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError, first_line

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def hf_config(path: Path) -> ModelConfig:
    return ModelConfig.from_json(path / "config.json")


def safetensors_files(path: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LowbitError(f"{index}: malformed shard index ({type(e).__name__}: {e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LowbitError(f"{index}: lists shard {f.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {bins[0]}: pickle checkpoints are not loaded; convert to safetensors)" if bins else ""
        raise LowbitError(f"{path}: no *.safetensors weights{hint}")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the shards, as stored (dtype untouched)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise LowbitError(f"{f}: truncated or corrupt safetensors file ({first_line(e)})") from None
    return sd


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise LowbitError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise LowbitError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None
