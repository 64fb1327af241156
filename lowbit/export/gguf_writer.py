"""`export_gguf`: a loaded model written as a GGUF file llama.cpp runs (architecture metadata, tokenizer, tensors).

What goes where:
  metadata   general.* (architecture, name, file type, quantization version), the architecture's hyperparameters
             ({arch}.block_count, context_length, embedding_length, feed_forward_length, attention.head_count,
             head_count_kv, layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, vocab_size) and the
             tokenizer (gguf_tokenizer.py: carried over from a GGUF source, else built from the HF tokenizer)
  tensors    under llama.cpp's names (the architecture record's table, inverted); q/k rows permuted as
             llama.cpp's converter does for the llama family; norms and biases F32; the head omitted when tied
  weights    --type F32 / F16: float (a quantized layer's dequantized weight); Q8_0 / Q4_0 / Q4_1: a lowbit
             quantized layer whose grid is that block format keeps its codes (gguf_blocks.repack; any other
             quantized layer is refused), a float weight is quantized by the gguf package. With Q4_0 / Q4_1
             the output head (the token embedding when tied) is Q8_0, as llama.cpp's quantizer keeps the head
             at higher precision (its Q6_K falls back to Q8_0 for rows not a multiple of 256, as here).
  K-quants   Q4_K / Q6_K are refused: the gguf package can dequantize them but not quantize them.

The file is written beside its destination and renamed into place (no half-written file on error).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit.atomic import atomic_file
from lowbit.errors import LowbitError, first_line
from lowbit.export.gguf_blocks import GRIDS, grid_name, permute_rows, quantize_float, repack
from lowbit.export.gguf_tokenizer import MetaValue, tokenizer_meta_from_gguf, tokenizer_meta_from_hf
from lowbit.models.arch import arch_of

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# general.file_type (llama.cpp's llama_ftype): the type most weights have
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
HEAD_TYPE = {"Q4_0": "Q8_0", "Q4_1": "Q8_0"}     # the output head's type where it differs from --type
QUANTIZATION_VERSION = 2                          # ggml's GGML_QNT_VERSION of the block layouts written


@dataclass
class GGUFExport:
    """What an export wrote: per-type tensor counts and how each quantized layer's codes got there."""
    path: Path
    type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    codes_kept: int = 0               # lowbit layers whose codes were copied
    constants_rounded: list[str] = field(default_factory=list)   # ... whose scale/offset was rounded to fp16
    dequantized: int = 0              # lowbit layers written as their float weight (F16/F32)
    requantized: int = 0              # float weights quantized by the gguf package
    tokenizer_from: str = ""
    seconds: float = 0.0
    nbytes: int = 0

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        how = [f"{self.codes_kept} quantized layers' codes copied" if self.codes_kept else "",
               f"{len(self.constants_rounded)} of them with scales/offsets rounded to fp16"
               if self.constants_rounded else "",
               f"{self.dequantized} quantized layers dequantized" if self.dequantized else "",
               f"{self.requantized} float weights quantized by gguf" if self.requantized else ""]
        parts = [f"{self.path}: {self.nbytes / 1e6:.1f} MB, {sum(self.tensor_types.values())} tensors ({types})",
                 *(h for h in how if h), f"tokenizer from {self.tokenizer_from}", f"{self.seconds:.1f} s"]
        return "; ".join(parts)


def check_type(qtype: str, flag: str = "--type") -> None:
    """A one-line refusal of a --type (or --head-type) this export cannot write."""
    import importlib.metadata

    import gguf

    if qtype not in TYPES:
        raise LowbitError(f"{flag}: unknown GGUF type {qtype!r} (choose from {', '.join(TYPES)})")
    if qtype in ("F32", "F16") or qtype in GRIDS:
        return
    try:   # a K-quant: ask the installed gguf package whether it can write one (0.19.0 cannot)
        gguf.quants.quantize(np.zeros((1, 256), np.float32), gguf.GGMLQuantizationType[qtype])
    except NotImplementedError:
        raise LowbitError(f"{flag} {qtype}: the gguf package ({importlib.metadata.version('gguf')}) can dequantize"
                          f" {qtype} but not quantize it; export Q8_0, Q4_0, Q4_1 or F16 "
                          f"(llama.cpp's llama-quantize can make {qtype} from an F16 export)") from None
    raise LowbitError(f"{flag} {qtype}: not written yet (supported: F32, F16, Q8_0, Q4_0, Q4_1)")


def _name_table(model) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for this model's blocks (the architecture record's table, inverted)."""
    record = arch_of(model.config)
    table = {}
    for g, hf in record.gguf_names.items():
        if "{i}" in g:
            table.update({hf.format(i=i): g.format(i=i) for i in range(model.config.num_layers)})
        else:
            table[hf] = g
    return table


def _tensors(model) -> dict[str, torch.Tensor | torch.nn.Module]:
    """HF name -> float tensor, or the quantized layer standing for `<module>.weight`; the tied head left out."""
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "layer_config")}
    prefixes = tuple(f"{n}." for n in quantized)
    out: dict[str, torch.Tensor | torch.nn.Module] = {}
    for k, v in model.state_dict().items():
        if not k.startswith(prefixes):
            out[k] = v
    for n, m in quantized.items():
        out[f"{n}.weight"] = m
        if getattr(m, "bias", None) is not None:
            out[f"{n}.bias"] = m.bias
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _tokenizer_meta(model, tok, source) -> tuple[list[MetaValue], str]:
    src = Path(source) if source is not None else None
    if src is not None and src.is_file():
        return tokenizer_meta_from_gguf(src), f"{src.name} (GGUF metadata carried over)"
    cfg = model.config
    return (tokenizer_meta_from_hf(tok, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id,
                                   where=str(source or "tokenizer")), "the HF tokenizer (built)")


def _hparams(model, arch: str) -> list[tuple[str, object, str]]:
    """(key, value, GGUFValueType name) of the architecture's hyperparameters."""
    cfg = model.config
    out = [(f"{arch}.vocab_size", cfg.vocab_size, "UINT32"),
           (f"{arch}.context_length", cfg.max_position_embeddings, "UINT32"),
           (f"{arch}.embedding_length", cfg.hidden_size, "UINT32"),
           (f"{arch}.feed_forward_length", cfg.intermediate_size, "UINT32"),
           (f"{arch}.block_count", cfg.num_layers, "UINT32"),
           (f"{arch}.attention.head_count", cfg.num_heads, "UINT32"),
           (f"{arch}.attention.head_count_kv", cfg.num_kv_heads, "UINT32"),
           (f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), "FLOAT32"),
           (f"{arch}.rope.freq_base", float(cfg.rope_theta), "FLOAT32"),
           (f"{arch}.rope.dimension_count", cfg.head_dim, "UINT32")]
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:   # llama.cpp assumes hidden / heads otherwise
        out += [(f"{arch}.attention.key_length", cfg.head_dim, "UINT32"),
                (f"{arch}.attention.value_length", cfg.head_dim, "UINT32")]
    return out


def export_gguf(model, tok, out_path: str | Path, type: str = "Q8_0", source: str | Path | None = None,
                overwrite: bool = False, head_type: str | None = None) -> GGUFExport:
    """Write `model` (lowbit's decoder, float or with quantized layers) and its tokenizer as a GGUF file of
    `type` (F32, F16, Q8_0, Q4_0, Q4_1) at `out_path`. source: the GGUF file the model was loaded from, whose
    tokenizer metadata is carried over (default: model.source when that is a file); otherwise the metadata
    is built from `tok`. head_type: the float output head's type (default: Q8_0 for Q4_0 / Q4_1, else `type`;
    F32 keeps a float model's head as it is, so llama.cpp reads the same head weights as lowbit).
    Returns what was written; a one-line LowbitError for anything that does not map."""
    import gguf

    t0 = time.perf_counter()
    out_path = Path(out_path)
    check_type(type)
    if head_type is not None:
        check_type(head_type, "--head-type")
    if out_path.exists() and not overwrite:
        raise LowbitError(f"-o {out_path}: already exists (pass --force to replace it)")
    if out_path.is_dir():
        raise LowbitError(f"-o {out_path}: is a directory; give a file name ending in .gguf")
    cfg = model.config
    record = arch_of(cfg)
    if record.gguf_arch is None:
        raise LowbitError(f"model: architecture {cfg.arch!r} has no GGUF name")
    if cfg.rope_scaling:
        raise LowbitError(f"model: rope scaling {cfg.rope_scaling.get('rope_type', cfg.rope_scaling)!r} is not "
                          f"written to GGUF yet")
    rep = GGUFExport(out_path, type)
    meta, rep.tokenizer_from = _tokenizer_meta(model, tok, source if source is not None
                                               else getattr(model, "source", None))
    names = _name_table(model)
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    permuted = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if record.gguf_qk_permuted else {}

    tensors: list[tuple[str, np.ndarray, str]] = []     # (GGUF name, data, GGUF type)
    for hf, v in _tensors(model).items():
        if hf not in names:
            raise LowbitError(f"model: tensor {hf!r} has no GGUF name for architecture {record.gguf_arch!r}")
        g = names[hf]
        is_layer = isinstance(v, torch.nn.Module)
        if not is_layer and v.ndim == 1:        # norms and biases: F32, as llama.cpp computes them
            want = "F32"
        else:
            want = (head_type or HEAD_TYPE.get(type, type)) if (g == head and not is_layer) else type
        if is_layer and want in GRIDS:
            packed = repack(v, want, hf.removesuffix(".weight"))
            data = packed.data
            rep.codes_kept += 1
            if not packed.exact:
                rep.constants_rounded.append(hf.removesuffix(".weight"))
        else:
            if is_layer:
                if not hasattr(v, "dequantized_weight"):
                    raise LowbitError(f"{hf.removesuffix('.weight')}: {grid_name(v)} has no dequantized weight "
                                      f"to write as {want}")
                w = v.dequantized_weight(torch.float32)
                rep.dequantized += 1
            else:
                w = v.detach().float()
                rep.requantized += want in GRIDS
            data = quantize_float(w.cpu().numpy(), want, hf)
        for proj, heads in permuted.items():    # llama.cpp's rotary pairs: rows interleaved per head
            if f".self_attn.{proj}." in hf:
                data = permute_rows(data, heads)
        tensors.append((g, data, want))
        rep.tensor_types[want] = rep.tensor_types.get(want, 0) + 1

    with atomic_file(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), record.gguf_arch)
        w.add_name(cfg.name or out_path.stem)
        w.add_file_type(FILE_TYPES[type])
        w.add_quantization_version(QUANTIZATION_VERSION)
        for key, val, vt in _hparams(model, record.gguf_arch):
            w.add_key_value(key, val, gguf.GGUFValueType[vt])
        for m in meta:
            w.add_key_value(m.key, m.value, m.vtype, sub_type=m.sub_type)
        for g, data, want in tensors:
            qt = gguf.GGMLQuantizationType[want]
            w.add_tensor(g, data, raw_dtype=qt if want in GRIDS else None)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        except OSError as e:
            raise LowbitError(f"-o {out_path}: cannot write ({first_line(e)})") from None
        finally:
            w.close()
    rep.nbytes = out_path.stat().st_size
    rep.seconds = time.perf_counter() - t0
    return rep
