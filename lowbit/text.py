"""Text sources and the one place that cuts token streams into windows (evaluation and calibration)."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError, first_line

# `--dataset NAME` -> (datasets.load_dataset args, split, column); joined with "\n\n" as in the GPTQ code.
DATASETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "test", "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), "test", "sentence"),
}


def read_text(path: str | Path) -> str:
    """A text file read in text mode (universal newlines: CRLF becomes LF)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"--text {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"--text {path}: not UTF-8 text (bad byte at offset {e.start})") from None


def load_dataset_text(name: str) -> str:
    """A named dataset's evaluation split through the `datasets` package (needs network or its cache)."""
    if name not in DATASETS:
        raise LowbitError(f"--dataset: unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    try:
        import datasets
    except ImportError:
        raise LowbitError("--dataset needs the `datasets` package: pip install 'lowbit[datasets]' "
                          "(or pass --text FILE)") from None
    args, split, col = DATASETS[name]
    try:
        rows = datasets.load_dataset(*args, split=split)[col]
    except Exception as e:
        raise LowbitError(f"--dataset {name}: cannot load it ({first_line(e)}); use --text FILE offline") from None
    return "\n\n".join(rows)


def tokenize_text(tok, text: str) -> torch.Tensor:
    """The whole text tokenized once, without special tokens (no BOS): ids [N]."""
    return torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """ids [N] -> non-overlapping windows [W, seqlen], tail dropped, first `limit` of them (GPTQ protocol)."""
    if seqlen < 2:
        raise LowbitError(f"--seqlen: must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise LowbitError(f"--seqlen {seqlen}: the text has only {ids.numel()} tokens, not one full window")
    if limit is not None:
        if limit <= 0:
            raise LowbitError(f"--windows: must be > 0, got {limit}")
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)                       # [W, seqlen]


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """ids [N] -> n windows [n, seqlen] starting at seeded random offsets (GPTQ's calibration sampling)."""
    if ids.numel() <= seqlen:
        raise LowbitError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)          # [n]
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])           # [n, seqlen]
