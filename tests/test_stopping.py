"""The one finishing rule shared by generate, the engine and speculative decoding."""
from __future__ import annotations

from types import SimpleNamespace

from lowbit.config import SamplingParams
from lowbit.stopping import append_token, eos_ids, final_text, stop_at


def test_eos_is_not_appended_and_ignore_eos_empties_the_set():
    cfg, tok = SimpleNamespace(eos_ids=[2]), SimpleNamespace(eos_token_id=7)
    assert eos_ids(cfg, tok, SamplingParams()) == {2, 7}
    assert eos_ids(cfg, None, SamplingParams()) == {2}
    assert eos_ids(cfg, tok, SamplingParams(ignore_eos=True)) == frozenset()
    ids = [5]
    assert append_token(ids, 7, SamplingParams(max_tokens=9), frozenset({7})) == "eos" and ids == [5]


def test_stop_string_then_length():
    decode = lambda ids: "".join(chr(96 + i) for i in ids)          # noqa: E731  1 -> "a", 2 -> "b", ...
    p = SamplingParams(max_tokens=3, stop=["bc"])
    ids: list[int] = []
    assert append_token(ids, 1, p, frozenset(), decode) is None
    assert append_token(ids, 2, p, frozenset(), decode) is None
    assert append_token(ids, 3, p, frozenset(), decode) == "stop" and ids == [1, 2, 3]   # stop beats length
    assert final_text("abc", "stop", p) == "a" and final_text("abc", "length", p) == "abc"
    ids = [1]
    assert append_token(ids, 4, SamplingParams(max_tokens=2), frozenset(), decode) == "length"
    assert append_token([], 2, p, frozenset(), None) is None         # no tokenizer: stop strings cannot match
    assert stop_at("xxbcyyb", ["y", "bc"]) == 2 and stop_at("abc", ["z"]) == -1
