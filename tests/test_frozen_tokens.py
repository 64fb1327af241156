"""tests/data/tokens.json, the method tests' frozen token ids, is the source of truth: a tokenizer upgrade that
would tokenize WikiText-2 differently does not move them (tests/data/make_tokens.py --check says whether it
would). What must hold is that they are the text they claim to be: through the model's tokenizer the test ids
decode to the start of WikiText-2 test, and every calibration window to a span of WikiText-2 valid."""
import pytest
import torch
from helpers import frozen_calib

from lowbit.text import read_text


def _decode(tok, ids) -> str:
    return tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)


def test_frozen_ids_decode_to_their_source_text(smollm2, frozen_test_ids, wiki_test_path, calib_path):
    tok = smollm2[1]
    assert frozen_test_ids.shape == (3072,) and frozen_test_ids.dtype == torch.long
    text = _decode(tok, frozen_test_ids)
    assert len(text) > 10_000 and read_text(wiki_test_path).startswith(text)
    valid = read_text(calib_path)
    windows = frozen_calib(20, 128).windows
    assert windows.shape == (20, 128)
    for i, w in enumerate(windows):
        span = _decode(tok, w).strip("\ufffd")                  # a window may cut a UTF-8 character at either end
        assert len(span) > 300 and span in valid, (i, span[:80])


def test_frozen_calib_seeds_are_disjoint_windows():
    a, b = frozen_calib(4, 32, seed=0), frozen_calib(4, 32, seed=4)
    assert a.windows.shape == b.windows.shape == (4, 32) and (a.seed, b.seed) == (0, 4)
    assert torch.equal(frozen_calib(2, 128, seed=1).windows[:, :32], frozen_calib(4, 32, seed=0).windows[2:])
    assert not any(torch.equal(x, y) for x in a.windows for y in b.windows)
    assert a.describe()["nsamples"] == 4 and a.describe()["seqlen"] == 32
    with pytest.raises(ValueError, match="20 windows of 128"):
        frozen_calib(4, 32, seed=5)
    with pytest.raises(ValueError):
        frozen_calib(2, 129)
