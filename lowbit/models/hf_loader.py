"""Read a Hugging Face model directory: config.json, safetensors shard(s), tokenizer files."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.config import ModelConfig, rename_fields
from lowbit.errors import LowbitError, first_line
from lowbit.files import field, read_json, regular_file
from lowbit.models.arch import config_from_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


# ModelConfig field -> config.json key, where they differ (errors name the key the file has)
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}


def config_json(f: Path) -> ModelConfig:
    """ModelConfig from a config.json file (any supported architecture), validated."""
    name = f.parent.name if f.name == "config.json" else f.stem
    d = read_json(f, "config file")
    try:
        return config_from_hf(d, name=name, where=str(f))
    except LowbitError as e:
        raise LowbitError(f"{f}: {rename_fields(str(e).removeprefix(f'{f}: '), HF_NAMES)}") from None


def hf_config(path: Path) -> ModelConfig:
    return config_json(path / "config.json")


def safetensors_files(path: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = field(read_json(index, "shard index"), "weight_map", dict, str(index))
        bad = [v for v in weight_map.values() if not isinstance(v, str) or not v or Path(v).name != v]
        if bad or not weight_map:
            raise LowbitError(f"{index}: field 'weight_map' must map tensor names to shard file names in this "
                              f"directory, got {bad[0] if bad else weight_map!r}")
        files = [path / f for f in sorted(set(weight_map.values()))]
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
