"""Helpers shared by the method tests (on the path through pytest's `pythonpath = tests`)."""
from __future__ import annotations

import functools
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.api import quantize


TOKENS = Path(__file__).resolve().parent / "data" / "tokens.json"    # tests/data/make_tokens.py writes it


@functools.cache
def _frozen() -> dict:
    return json.loads(TOKENS.read_text())


def frozen_test_ids() -> torch.Tensor:
    """The frozen WikiText-2 test ids [3072] (see tests/data/make_tokens.py)."""
    return torch.tensor(_frozen()["test"]["ids"], dtype=torch.long)


def frozen_calib(nsamples: int, seqlen: int, seed: int = 0):
    """A Calibration of frozen WikiText-2 valid windows: windows seed*nsamples .. (seed+1)*nsamples - 1 of the
    file's 20 x 128, each cut to its first `seqlen` ids (so seeds give disjoint windows)."""
    from lowbit.quant.api import Calibration

    windows = _frozen()["calib"]["windows"]
    if nsamples <= 0 or (seed + 1) * nsamples > len(windows) or not 1 < seqlen <= len(windows[0]):
        raise ValueError(f"frozen_calib({nsamples}, {seqlen}, seed={seed}): tests/data/tokens.json has "
                         f"{len(windows)} windows of {len(windows[0])} ids")
    ids = torch.tensor(windows[seed * nsamples: (seed + 1) * nsamples], dtype=torch.long)[:, :seqlen]
    return Calibration(ids.contiguous(), f"tests/data/tokens.json (WikiText-2 valid, seed {seed})", seed)


def copy_first_blocks(model, k):
    """A copy of `model` whose first k decoder blocks are its own; every other module (embeddings, head, the
    remaining blocks) is shared with `model` through deepcopy's memo, which saves copying 500 MB per test.
    Only the first k blocks may be changed."""
    shared = [model.model.embed_tokens, model.model.norm, model.lm_head, *list(model.model.layers)[k:]]
    return copy.deepcopy(model, memo={id(m): m for m in shared})


def quantize_first_blocks(model, method, calib, k, **opts):
    """The layer walk over the first k decoder blocks only; the others stay float (and in the model)."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers)[:k])
    try:
        return quantize(model, method, calib, progress=False, **opts)
    finally:
        model.model.layers = layers


def mean_output_rel_mse(result) -> float:
    return sum(r.output_rel_mse for r in result.report.layers) / len(result.report.layers)


@torch.no_grad()
def logits(model, ids):
    """ids [W, S] -> logits [W, S, V], one window at a time."""
    return torch.cat([model(ids[i: i + 1]) for i in range(ids.shape[0])])


def ppl_kl(logits, base, ids):
    """(perplexity, mean KL(base || model)) over the next-token predictions of ids [W, S]."""
    lp, bp = F.log_softmax(logits[:, :-1], -1), F.log_softmax(base[:, :-1], -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).mean()
    return math.exp(nll), (bp.exp() * (bp - lp)).sum(-1).mean().item()


_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x, n):
    for i in range(0, n):
        tl.store(x + i, i)
t = torch.zeros(3, dtype=torch.int32)
k[(1,)](t, 3)
assert t.tolist() == [0, 1, 2]
"""


@functools.cache
def triton_interpreter_ok() -> bool:
    """Whether Triton's CPU interpreter runs here (Triton installed, and a numpy it supports: Triton 3.6's
    interpreter breaks on numpy >= 2.4). Kernel tests under the interpreter skip otherwise."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("triton") is None:
        return False
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120)
    return r.returncode == 0
