"""The `lowbit` command end to end on the real default model."""
import json
from pathlib import Path

import pytest

from lowbit.cli.main import main

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("inspect", "eval", "generate"):
        assert cmd in out


def test_inspect_default_model_and_8b_config(tmp_path, capsys):
    assert main(["inspect", "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["params_total"] == 134_515_008
    # SmolLM2: 2 (K,V) * 30 layers * 3 kv heads * 64 dims * 2 bytes per token
    assert s["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    assert main(["inspect", "--config", str(CONFIGS / "llama-3-8b.json"), "--json", str(tmp_path / "l.json")]) == 0
    l8 = json.loads((tmp_path / "l.json").read_text())
    assert l8["params_total"] == 8_030_261_248 and l8["decode_tokens_per_s_bound"] > 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "memory" in out


def test_inspect_llama7b_worked_example(tmp_path):
    out = tmp_path / "7b.json"
    assert main(["inspect", "--config", str(CONFIGS / "llama-2-7b.json"), "--batch", "64", "--seqlen", "2048",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kv_cache_bytes"] == 2 * 64 * 2048 * 4096 * 32 * 2  # 68.7 GB


def test_eval_json(tmp_path, wiki_test_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "--text", str(wiki_test_path), "--seqlen", "128", "--windows", "2",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    for k in ("perplexity", "tokens", "windows", "seqlen", "seconds"):
        assert k in r
    assert r["windows"] == 2 and r["tokens"] == 254 and r["seqlen"] == 128
    assert "perplexity" in capsys.readouterr().out


def test_eval_with_base(tmp_path, wiki_test_path):
    out = tmp_path / "k.json"
    assert main(["eval", "--text", str(wiki_test_path), "--seqlen", "64", "--windows", "1",
                 "--json", str(out), "--no-progress", "--base"]) == 0  # bare --base: the default model
    r = json.loads(out.read_text())
    assert r["kl"] == pytest.approx(0, abs=1e-6) and r["top1_agreement"] == 1.0


def test_generate_streams_and_times(capsys):
    assert main(["generate", "What is the capital of France?", "--greedy", "--max-new-tokens", "20"]) == 0
    cap = capsys.readouterr()
    assert "Paris" in cap.out
    assert "prefill" in cap.err and "tok/s" in cap.err


def test_bad_arguments(capsys, tmp_path):
    assert main(["inspect", "--gpu", "tpu9"]) == 2
    assert "tpu9" in capsys.readouterr().err
    assert main(["eval", "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: file not found" in capsys.readouterr().err
    assert main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
