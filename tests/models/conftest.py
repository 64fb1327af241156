"""Helpers for the malformed-input tests: run a load under a time limit, check its one-line error."""
from __future__ import annotations

import threading
import time
import warnings

import pytest

from lowbit.errors import LowbitError

LIMIT_S = 10.0


def _run_limited(fn, seconds: float = LIMIT_S):
    """(result, exception, warnings, seconds) of fn() run in a daemon thread; fails the test if it is still
    running after `seconds` (a hang must not hang the suite)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        th = threading.Thread(target=target, daemon=True)
        th.start()
        th.join(seconds)
        took = time.perf_counter() - t0
    assert not th.is_alive(), f"still running after {seconds:.0f} s"
    return box.get("result"), box.get("error"), [str(w.message) for w in caught], took


def _expect_error(fn, *needles: str, seconds: float = LIMIT_S) -> str:
    """fn() raises, within `seconds`, a LowbitError whose message is one line containing every needle."""
    _, err, _, took = _run_limited(fn, seconds)
    assert isinstance(err, LowbitError), f"expected a LowbitError, got {err!r}"
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert took < seconds
    return msg


@pytest.fixture(scope="session")
def real_gguf(default_path):
    """gguf's reader over the real SmolLM2 file (metadata, tensor bytes and byte offsets), read once."""
    import gguf
    return gguf.GGUFReader(default_path)


@pytest.fixture
def run_limited():
    return _run_limited


@pytest.fixture
def expect_error():
    return _expect_error


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Converted GGUF tokenizers go to a per-test cache: a malformed file never meets another's entry."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
