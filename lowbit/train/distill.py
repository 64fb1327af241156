"""Knowledge distillation: `DistillConfig` + `run_distill(teacher, student, tok, cfg, data)`.

  white  the student matches the teacher's next-token distribution on text (forward or reverse KL), and with
         --feature-loss also its hidden states after aligned blocks (relative MSE);
  black  the teacher writes continuations of prompts drawn from the text (only its text is seen) and the
         student learns them with cross-entropy;
  ce     no teacher: cross-entropy on the text itself, the baseline distillation has to beat.

The student is a shallower copy of the teacher (`shallow_copy`: every other block, as DistilBERT initialised
its student) or any loaded model, e.g. the teacher's quantized copy (its quantized layers train through
QATLinear and are rounded back at the end).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lowbit.errors import LowbitError
from lowbit.layers import WeightOnlyLinear, swap_linear
from lowbit.quant.registry import option
from lowbit.text import random_windows, read_text, tokenize_text
from lowbit.train.data import continue_sequences, epoch_batches, text_batches
from lowbit.train.loop import TrainLog, autocast, train
from lowbit.train.losses import cross_entropy, hidden_mse, kl_div
from lowbit.train.qat import convert_qat
from lowbit.train.qat_linear import QATLinear


@dataclass
class DistillConfig:
    mode: Literal["white", "black", "ce"] = option("white", "white: teacher's logits (and hidden states); black: "
                                                            "teacher-generated text; ce: the text alone (baseline)")
    reverse_kl: bool = option(False, "white: KL(student || teacher) instead of KL(teacher || student)")
    temperature: float = option(1.0, "white: softmax temperature of both distributions")
    feature_loss: bool = option(False, "white: add the relative MSE of hidden states after aligned blocks")
    feature_weight: float = option(1.0, "white: weight of the hidden-state loss")
    steps: int = option(300, "optimizer steps")
    lr: float = option(2e-4, "peak learning rate (AdamW, 5% warm-up, cosine decay)")
    batch_size: int = option(8, "sequences per step")
    seqlen: int = option(512, "tokens per training sequence")
    prompt_len: int = option(32, "black: prompt tokens taken from the text before the teacher continues")
    black_samples: int = option(512, "black: sequences the teacher writes")
    top_k: int = option(50, "black: the teacher samples from its top-k")
    seed: int = option(0, "seed of data order and sampling")

    def __post_init__(self):
        for name in ("steps", "batch_size", "black_samples", "prompt_len", "temperature", "lr"):
            if getattr(self, name) <= 0:
                raise LowbitError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.mode == "black" and not 0 < self.prompt_len < self.seqlen:
            raise LowbitError(f"--prompt-len {self.prompt_len}: must be below --seqlen {self.seqlen}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_blocks(text: str, num_layers: int) -> list[int]:
    """'0,2,4' or 'every-2' -> sorted block indices of the teacher to keep."""
    try:
        if text.startswith("every-"):
            blocks = list(range(0, num_layers, int(text.removeprefix("every-"))))
        else:
            blocks = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise LowbitError(f"--student-blocks: expected indices like 0,2,4 or every-2, got {text!r}") from None
    if not blocks or blocks[0] < 0 or blocks[-1] >= num_layers:
        raise LowbitError(f"--student-blocks {text!r}: indices must lie in [0, {num_layers - 1}]")
    return blocks


def shallow_copy(teacher, blocks: list[int]):
    """A student with the teacher's embeddings, final norm and head, and copies of the listed blocks."""
    student = copy.deepcopy(teacher)
    student.config = dataclasses.replace(teacher.config, num_layers=len(blocks))
    student.model.layers = torch.nn.ModuleList(student.model.layers[b] for b in blocks)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i   # the KV cache is indexed by the student's own block number
    student.block_map = list(blocks)
    return student


def forward_hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ids [B, T] -> (logits [B, T, V], hidden state after every block, each [B, T, d])."""
    x, cos, sin, mask = model.embed(ids)
    hidden = []
    for layer in model.model.layers:
        x = layer(x, cos, sin, None, mask)
        hidden.append(x)
    return model.head(x), hidden


def aligned_targets(block_map: list[int], num_teacher: int) -> list[int]:
    """For student block i (a copy of teacher block block_map[i]): the teacher block whose output it
    replaces, the one just before the next kept block (the teacher's last block for the last student block)."""
    return [nxt - 1 for nxt in block_map[1:]] + [num_teacher - 1]


def trainable(student) -> list[torch.nn.Parameter]:
    """Every parameter of the student; its quantized layers (a quantized copy) become QATLinears."""
    for name, m in list(student.named_modules()):
        if isinstance(m, WeightOnlyLinear):
            swap_linear(student, name, QATLinear.from_weight_only(m).to(student.device))
    student.requires_grad_(True)
    return list(student.parameters())


def distill_batches(teacher, tok, cfg: DistillConfig, data: str, progress: bool = True):
    """(endless batches, the data's description, the first generated position: 0 unless black)."""
    ids = tokenize_text(tok, read_text(data))                                         # [N]
    desc = {"source": str(Path(data)), "tokens": ids.numel(), "seqlen": cfg.seqlen}
    if cfg.mode != "black":
        return text_batches(ids, cfg.batch_size, cfg.seqlen, cfg.seed), desc, 0
    prompts = random_windows(ids, cfg.black_samples, cfg.prompt_len, seed=cfg.seed)  # [n, P]
    seqs = continue_sequences(teacher, prompts, cfg.seqlen, cfg.top_k, seed=cfg.seed, progress=progress)
    desc.update(teacher_sequences=cfg.black_samples, prompt_len=cfg.prompt_len, top_k=cfg.top_k)
    return epoch_batches(seqs, cfg.batch_size, cfg.seed), desc, cfg.prompt_len


def run_distill(teacher, student, tok, cfg: DistillConfig, data: str, device: str | None = None,
                progress: bool = True) -> tuple[TrainLog, dict]:
    """Train `student` (in place) from `teacher` on text file `data`; returns the log and the data's description."""
    dev = torch.device(device or teacher.device)
    teacher.to(dev).float().eval().requires_grad_(False)
    student.to(dev).float()
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LowbitError(f"--student: vocabulary {student.config.vocab_size} differs from the teacher's "
                          f"{teacher.config.vocab_size}: distillation needs the same tokenizer")
    block_map = getattr(student, "block_map", None)
    if cfg.feature_loss and block_map is None:
        raise LowbitError("--feature-loss needs a student made with --student-blocks (which blocks align)")
    targets = aligned_targets(block_map, teacher.config.num_layers) if block_map else None
    batches, desc, first = distill_batches(teacher, tok, cfg, data, progress)
    params = trainable(student)
    student.train()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(dev)                                                             # [B, T]
        with autocast(dev):
            logits, hs = forward_hidden(student, ids)                                 # [B, T, V]
            if cfg.mode != "white":     # ce on the text, black on the teacher's generated part
                return cross_entropy(logits[:, max(first - 1, 0):], ids[:, max(first - 1, 0):])
            with torch.no_grad():
                t_logits, t_hs = forward_hidden(teacher, ids)
        loss = kl_div(logits, t_logits, cfg.temperature, cfg.reverse_kl)
        if cfg.feature_loss:
            loss = loss + cfg.feature_weight * hidden_mse(hs, [t_hs[j] for j in targets])
        return loss

    log = train(params, loss_fn, batches, cfg.steps, cfg.lr, desc=f"distill {cfg.mode}", progress=progress)
    student.eval()
    convert_qat(student)
    return log, desc
