"""Quantization-aware training: `QATConfig` + `run_qat(model, tok, cfg, data)`.

  1. The float model is copied as the teacher (frozen).
  2. Every decoder-block Linear becomes a QATLinear: from the float weight (--init rtn), or from a PTQ
     result (--init gptq | awq: the method runs first, the training starts from its grid).
  3. Training data: windows of a text file, or (--data self, LLM-QAT) sequences the float model writes
     from a random first token. The loss is KL(teacher || student) on every position (or plain CE).
  4. The QATLinears are rounded into the layers PTQ produces, so the result saves, loads and exports as any
     quantized checkpoint does.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import WeightOnlyLinear, swap_linear
from lowbit.layers.kv_quant import KVQuant
from lowbit.quant.registry import option
from lowbit.train.data import epoch_batches, self_generated, text_batches
from lowbit.train.loop import TrainLog, autocast, train
from lowbit.train.losses import cross_entropy, kl_div
from lowbit.train.qat_linear import QATLinear


@dataclass
class QATConfig:
    bits: int = option(4, "weight bits, 2..8")
    group_size: int = option(128, "weights per scale along the input; -1 per output channel")
    sym: bool = option(False, "symmetric weight grid (no zero point)")
    zero_point: Literal["int", "float"] = option("int", "asymmetric offset: integer zero point or real minimum")
    act_bits: int = option(0, "0: weight-only; 8: int8 per-token activations too (W4A8 / W8A8 simulation)")
    kv_cache: Literal["none", "int8", "fp8"] = option("none", "train with (and save) a quantized KV cache")
    init: Literal["rtn", "gptq", "awq"] = option("rtn", "starting grid: min/max of the float weights, or a "
                                                        "PTQ method's result (calibrated on the training data)")
    learn_scales: bool = option(False, "learn per-group scales and zero points (LSQ); otherwise min/max each step")
    loss: Literal["kl", "ce"] = option("kl", "kl: match the float model's logits (LLM-QAT); ce: next-token labels")
    steps: int = option(200, "optimizer steps")
    lr: float = option(2e-5, "peak learning rate (AdamW, 5% warm-up, cosine decay)")
    batch_size: int = option(8, "sequences per step")
    seqlen: int = option(512, "tokens per training sequence")
    self_samples: int = option(256, "--data self: sequences the float model generates")
    self_top_k: int = option(50, "--data self: sample from the top-k")
    self_greedy: int = option(3, "--data self: tokens after the random first one taken by argmax "
                                 "(LLM-QAT's hybrid sampling)")
    nsamples: int = option(32, "--init gptq|awq: calibration sequences from the training data")
    seed: int = option(0, "seed of data order, sampling and generation")

    def __post_init__(self):
        self.spec = QuantSpec(bits=self.bits, symmetric=self.sym, group_size=self.group_size,
                              zero_point=self.zero_point)
        for name in ("steps", "batch_size", "self_samples", "nsamples"):
            if getattr(self, name) <= 0:
                raise LowbitError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise LowbitError(f"--seqlen: must be >= 2, got {self.seqlen}")
        if self.act_bits not in (0, 8):
            raise LowbitError(f"--act-bits: 0 (weight-only) or 8 (int8 per-token activations), got {self.act_bits}")

    def to_dict(self) -> dict:
        return asdict(self)


class STEKVQuant(KVQuant):
    """KVQuant whose quantize-dequantize passes gradients straight through (for training through it)."""

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return x + (super().roundtrip(x) - x).detach()


def block_linears(model) -> dict[str, nn.Module]:
    """Dotted name -> module of every Linear of the decoder blocks, as the architecture record lists them
    (the layout the PTQ walk quantizes)."""
    layout = model.arch.layout
    blocks = model.get_submodule(layout.blocks)
    return {f"{layout.blocks}.{i}.{n}": block.get_submodule(n) for i, block in enumerate(blocks)
            for n in layout.linears}


def prepare_qat(model, cfg: QATConfig) -> list[nn.Parameter]:
    """Swap the block Linears (float or WeightOnlyLinear) for QATLinears; returns what trains: their
    weights and scales, and the RMSNorm gains (the embeddings and the tied head stay frozen)."""
    model.requires_grad_(False)
    for name, m in block_linears(model).items():
        if isinstance(m, WeightOnlyLinear):
            new = QATLinear.from_weight_only(m, cfg.learn_scales, cfg.act_bits)
        elif isinstance(m, nn.Linear):
            new = QATLinear.from_linear(m, cfg.spec, cfg.learn_scales, cfg.act_bits)
        else:
            continue
        swap_linear(model, name, new.to(model.device))
    if cfg.kv_cache != "none":
        model.set_kv_quant(STEKVQuant(cfg.kv_cache))
    params = [p for m in model.modules() if isinstance(m, QATLinear) for p in m.parameters()]
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    for p in params + norms:
        p.requires_grad_(True)
    return params + norms


def convert_qat(model) -> int:
    """Round every QATLinear into its inference layer; returns how many were converted."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            swap_linear(model, name, m.to_quantized())
            n += 1
    if isinstance(model.kv_quant, STEKVQuant):
        model.set_kv_quant(KVQuant(model.kv_quant.dtype))
    model.requires_grad_(False)
    return n


def qat_batches(teacher, tok, cfg: QATConfig, data: str, progress: bool = True):
    """(endless training batches, calibration windows [n, seqlen], a description of the data)."""
    if data == "self":
        seqs = self_generated(teacher, cfg.self_samples, cfg.seqlen, cfg.self_top_k, cfg.self_greedy,
                              seed=cfg.seed, progress=progress)                      # [n, seqlen]
        desc = {"source": "self", "sequences": cfg.self_samples, "seqlen": cfg.seqlen, "top_k": cfg.self_top_k,
                "greedy_first": cfg.self_greedy}
        return epoch_batches(seqs, cfg.batch_size, cfg.seed), seqs[: cfg.nsamples], desc
    from lowbit.text import random_windows, read_text, tokenize_text

    ids = tokenize_text(tok, read_text(data))                                        # [N]
    desc = {"source": str(Path(data)), "tokens": ids.numel(), "seqlen": cfg.seqlen}
    calib = random_windows(ids, cfg.nsamples, cfg.seqlen, seed=cfg.seed)             # [nsamples, seqlen]
    return text_batches(ids, cfg.batch_size, cfg.seqlen, cfg.seed), calib, desc


def run_qat(model, tok, cfg: QATConfig, data: str, device: str | None = None,
            progress: bool = True) -> tuple[TrainLog, dict]:
    """Train `model` (in place) to its quantized form; returns the training log and the data description.
    data: a text file, or "self" for LLM-QAT's self-generated sequences."""
    dev = torch.device(device or model.device)
    model.to(dev).float()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    batches, calib, desc = qat_batches(teacher, tok, cfg, data, progress)
    if cfg.init != "rtn":
        from lowbit.quant.api import Calibration, quantize
        quantize(model, cfg.init, Calibration(calib, desc["source"], cfg.seed), device=str(dev), progress=progress,
                 bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, zero_point=cfg.zero_point)
    params = prepare_qat(model, cfg)
    model.train()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(dev)                                                            # [B, T]
        with autocast(dev):
            logits = model(ids)                                                      # [B, T, V]
            if cfg.loss == "ce":
                return cross_entropy(logits, ids)
            with torch.no_grad():
                target = teacher(ids)                                                # [B, T, V]
        return kl_div(logits, target)

    log = train(params, loss_fn, batches, cfg.steps, cfg.lr, desc=f"qat w{cfg.bits}", progress=progress)
    model.eval()
    convert_qat(model)
    return log, desc
