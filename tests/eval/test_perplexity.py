"""Perplexity / KL / top-1 against transformers and direct formulas, on real WikiText-2 windows."""
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import Reference, evaluate, window_stats
from lowbit.text import eval_windows, random_windows, read_text, tokenize_text


def test_perplexity_equals_transformers(smollm2, hf_smollm2, wiki_ids):
    """First 2 windows of 256 tokens: our PPL vs transformers' own loss on the same windows."""
    model, _ = smollm2
    windows = eval_windows(wiki_ids, 256, 2)
    ours = evaluate(model, windows, progress=False)
    with torch.no_grad():  # HF's labels=ids shifts internally and averages over the S-1 predictions
        nll = sum(hf_smollm2(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    assert ours.tokens == 2 * 255 and ours.windows == 2
    assert abs(ours.perplexity / math.exp(nll) - 1) < 1e-3
    assert 5 < ours.perplexity < 100                                      # a trained model on English


def test_kl_and_top1(smollm2, wiki_ids):
    model, _ = smollm2
    windows = eval_windows(wiki_ids, 128, 1)
    same = evaluate(model, windows, base=model, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.base_perplexity == pytest.approx(same.perplexity)


def test_window_stats_direct_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    t = torch.randint(0, 11, (7,), generator=g)
    s = window_stats(a, t, b)
    pa, pb = a.double().softmax(-1), b.double().softmax(-1)
    kl = sum((pb[i] * (pb[i].log() - pa[i].log())).sum().item() for i in range(7))
    assert s["kl"] == pytest.approx(kl, rel=1e-5)
    assert s["nll"] == pytest.approx(F.cross_entropy(a.double(), t, reduction="sum").item(), rel=1e-6)
    assert s["top1"] == (a.argmax(-1) == b.argmax(-1)).sum().item()
    assert window_stats(a, t, Reference.of(b, t)) == s                   # the shared reference path


def test_windows_protocol(smollm2, wiki_test_path):
    tok = smollm2[1]
    text = read_text(wiki_test_path)
    assert "\r" not in text                                               # universal newlines
    ids = tokenize_text(tok, text[:5000])
    assert ids[0].item() != tok.bos_token_id                              # no BOS prepended
    w = eval_windows(ids, 100)
    assert w.shape == (ids.numel() // 100, 100) and torch.equal(w.flatten(), ids[: w.numel()])
    assert eval_windows(ids, 100, 3).shape == (3, 100)
    r1, r2 = random_windows(ids, 4, 64, seed=0), random_windows(ids, 4, 64, seed=0)
    assert torch.equal(r1, r2) and not torch.equal(r1, random_windows(ids, 4, 64, seed=1))


def test_bad_inputs(tmp_path):
    with pytest.raises(LowbitError, match="file not found"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LowbitError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt")
    with pytest.raises(LowbitError, match="not one full window"):
        eval_windows(torch.arange(10), 2048)
    with pytest.raises(LowbitError, match="--windows"):
        eval_windows(torch.arange(10), 2, 0)
