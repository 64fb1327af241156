"""Read a Hugging Face model directory: config.json, safetensors shard(s), tokenizer files."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.config import ModelConfig
from lowbit.errors import LowbitError, first_line
from lowbit.files import field, read_json, regular_file
from lowbit.models.arch import config_from_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def config_json(f: Path) -> ModelConfig:
    """ModelConfig from a config.json file (any supported architecture), validated."""
    name = f.parent.name if f.name == "config.json" else f.stem
    return config_from_hf(read_json(f, "config file"), name=name, where=str(f))


def hf_config(path: Path) -> ModelConfig:
    return config_json(path / "config.json")


def safetensors_files(path: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = field(read_json(index, "shard index"), "weight_map", dict, str(index))
        names = set(weight_map.values())
        bad = next((n for n in names if not isinstance(n, str) or Path(n).name != n or not n), None)
        if bad is not None or not names:
            raise LowbitError(f"{index}: field 'weight_map' must map tensor names to shard file names in this "
                              f"directory, got {bad!r}")
        files = [path / f for f in sorted(names)]
        for f in files:
            if not f.exists():
                raise LowbitError(f"{index}: lists shard {f.name}, which is missing")
            regular_file(f, "shard")
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
        regular_file(f, "safetensors file")
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
