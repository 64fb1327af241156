"""`lowbit serve` refuses bad arguments and unloadable models in one line (exit 2), before binding a port;
a model the engine process cannot load is reported from that process."""
from __future__ import annotations

import pytest

from lowbit.cli.main import main


def _one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["--port", "70000"], "--port"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-waiting", "-1"], "--max-waiting"),
    (["--drain-timeout", "-5"], "--drain-timeout"),
])
def test_bad_arguments(capsys, args, needle):
    assert main(["serve", *args]) == 2
    assert needle in _one_line_error(capsys)


def test_unloadable_model_is_one_line_from_the_engine_process(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    assert main(["serve", str(bad), "--port", "0"]) == 2
    assert "broken.gguf" in _one_line_error(capsys)


def test_missing_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf" in _one_line_error(capsys)
