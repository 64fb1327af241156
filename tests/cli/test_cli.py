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


# ----------------------------------------------------------------------------- quantize: flags from the method configs

def _method_fields():
    """{method: its config's dataclass fields} of every registered method."""
    import dataclasses

    from lowbit.quant.registry import registered_methods
    return {m: dataclasses.fields(cls.config_cls) for m, cls in registered_methods().items()}


def _argv_value(f) -> tuple[list[str], object]:
    """CLI arguments setting field f to its default (8 for an unset int), and that value."""
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        return [flag if f.default else "--no-" + flag[2:]], f.default
    value = 8 if f.default is None else f.default
    return [flag, str(value)], value


def test_quantize_help_lists_every_method_option(capsys, monkeypatch):
    """Every config field of every registered method is a `lowbit quantize` flag whose help names the method."""
    monkeypatch.setenv("COLUMNS", "1000")                                 # no wrapping inside a help text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    entries, flag = {}, None                                               # option string -> its help
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):                                         # an option, help beside or below
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += line
        else:
            flag = None
    for method, fields in _method_fields().items():
        for f in fields:
            flag = "--" + f.name.replace("_", "-")
            assert flag in entries and f"{method}=" in entries[flag], (flag, method, entries.get(flag))


def test_quantize_flags_set_every_method_option(tmp_path, capsys):
    """Each method takes all of its fields from the command line: the parsed flags build the same config as
    the values themselves, and the real command accepts them (it stops at the existing -o, before loading)."""
    from lowbit.cli.main import build_parser
    from lowbit.quant.registry import get_method, registered_methods

    (tmp_path / "q").mkdir()
    for method, fields in _method_fields().items():
        argv, values = ["quantize", "--method", method, "-o", str(tmp_path / "q")], {}
        for f in fields:
            args, values[f.name] = _argv_value(f)
            argv += args
        ns = build_parser().parse_args(argv)
        cfg_cls = registered_methods()[method].config_cls
        assert get_method(method, **{k: getattr(ns, k) for k in values}).cfg == cfg_cls(**values)
        assert main(argv) == 2
        assert "already exists" in capsys.readouterr().err, method


def test_quantize_inapplicable_flag_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "q"
    for method, argv, flag in (("rtn", ["--max-shrink", "0.3"], "--max-shrink"), ("w8a8", ["--bits", "4"], "--bits"),
                               ("gptq", ["--no-lkd-norms"], "--lkd-norms")):
        assert main(["quantize", "--method", method, *argv, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and flag in err and f"--method {method}" in err, err
    assert not out.exists()


def test_quantize_on_the_default_model(tmp_path, capsys):
    """The real command end to end: RTN W8 g64 asymmetric, its options in the checkpoint's config."""
    out = tmp_path / "rtn"
    assert main(["quantize", "--method", "rtn", "--bits", "8", "--group-size", "64", "--no-sym", "-o", str(out)]) == 0
    method = json.loads((out / "quantization_config.json").read_text())["method"]
    assert method == {"method": "rtn", "bits": 8, "group_size": 64, "sym": False, "zero_point": "int",
                      "bits_budget": 0.0, "observer": "minmax"}
    assert "saved" in capsys.readouterr().out
