"""The CLI's error boundary: one line on stderr (the traceback only with --debug), exit 2 for a bad input,
1 for a bug; --strict refuses NaN weights that otherwise load with a one-line warning."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli.main import main
from lowbit.config import ModelConfig
from lowbit.models.arch import config_to_hf
from lowbit.models.llama import LlamaForCausalLM


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture
def nan_dir(tmp_path):
    """A tiny HF directory whose up_proj weight holds a NaN (and no tokenizer)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=2, num_kv_heads=1, tie_word_embeddings=True))
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    d = tmp_path / "nan"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    save_file(sd, str(d / "model.safetensors"))
    return d


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert main(["eval", str(p), "--text", str(text)]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}: truncated or corrupt GGUF file"), lines


def test_debug_prints_the_traceback(tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00")
    for argv in (["--debug", "eval", str(p), "--text", str(p)], ["eval", str(p), "--text", str(p), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_unexpected_exception_is_one_line_exit_1(monkeypatch, capsys):
    import lowbit.cli.inspect_cmd as inspect_cmd

    def broken(args):
        return {}["a key nobody wrote"]
    monkeypatch.setattr(inspect_cmd, "run", broken)
    assert main(["inspect"]) == 1
    lines = _err_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: unexpected KeyError: 'a key nobody wrote'") and "rerun with --debug" in lines[0]
    assert main(["inspect", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "the traceback is above" in err


def test_strict_refuses_nan_weights_else_one_line_warning(nan_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    assert main(["eval", str(nan_dir), "--text", str(text), "--strict"]) == 2
    lines = _err_lines(capsys)
    assert lines == [f"error: {nan_dir / 'model.safetensors'}: NaN or Inf in 1 tensor: "
                     f"model.layers.0.mlp.up_proj.weight (refused: --strict)"]
    assert main(["eval", str(nan_dir), "--text", str(text)]) == 2      # loads, warns, then lacks a tokenizer
    lines = _err_lines(capsys)
    assert lines[0] == (f"warning: {nan_dir / 'model.safetensors'}: NaN or Inf in 1 tensor: "
                        f"model.layers.0.mlp.up_proj.weight")
    assert lines[1].startswith("error: ") and "no tokenizer files" in lines[1] and len(lines) == 2


@pytest.mark.parametrize("argv,needle", [
    (["--method", "magnitude", "--sparsity", "3:2"], "--sparsity"),
    (["--method", "rtn", "--bits-budget", "3.5", "--format", "gptq"], "--bits-budget"),
    (["--method", "wanda", "--bits", "4"], "does not apply"),
])
def test_sparsity_and_budget_flags_refuse_in_one_line(tmp_path, capsys, argv, needle):
    assert main(["quantize", *argv, "-o", str(tmp_path / "out")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--format", "gguf", "--type", "Q4_K"], "error: --type Q4_K: the gguf package"),   # (0.19.0) can dequantize...
    (["--format", "gguf", "--type", "Q3_X"], "error: --type: unknown GGUF type 'Q3_X'"),
    (["--format", "gptq", "--type", "Q8_0"], "error: --type: only --format gguf takes a type (got --format gptq)"),
    (["--format", "gguf", "--head-type", "Q3_X"], "error: --head-type: unknown GGUF type 'Q3_X'"),
    (["--format", "onnx", "--head-type", "F32"], "error: --head-type: only --format gguf takes a type (got --format onnx)"),
    (["--format", "gptq"], "error: MODEL: --format gptq rewrites a quantized directory; name one"),
])
def test_export_refusals_are_one_line_before_loading(tmp_path, capsys, argv, needle):
    out = tmp_path / "o.gguf"
    assert main(["export", *argv, "-o", str(out)]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(needle), lines
    assert not list(tmp_path.iterdir())


def test_export_gguf_needs_a_gguf_file_name(tmp_path, capsys):
    assert main(["export", "--format", "gguf", "-o", str(tmp_path / "out")]) == 2
    assert _err_lines(capsys) == [f"error: -o {tmp_path / 'out'}: --format gguf writes one file; give a name "
                                  f"ending in .gguf"]


@pytest.mark.parametrize("argv,needle", [
    (["--format", "gptq", "--form", "qdq", "-o", "o"], "error: --form: only --format onnx takes it (got --format gptq)"),
    (["--format", "gguf", "--dtype", "fp16", "-o", "o.gguf"], "error: --dtype: only --format onnx takes it"),
    (["--format", "onnx", "-o", "model.onnx"], "error: -o model.onnx: --format onnx writes a directory"),
])
def test_export_onnx_flag_refusals_are_one_line_before_loading(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *argv]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(needle), lines
    assert not list(tmp_path.iterdir())


def test_export_onnx_refuses_a_layer_that_does_not_map(smollm2_4, tmp_path, capsys):
    """A 3-bit checkpoint as QOperator: one line naming the first layer and why; nothing written."""
    import copy

    from lowbit.quant.api import quantize
    model = copy.deepcopy(smollm2_4[0])
    quantize(model, "rtn", None, progress=False, bits=3, group_size=32).save(model, smollm2_4[1], tmp_path / "q3")
    assert main(["export", str(tmp_path / "q3"), "--format", "onnx", "--form", "qoperator",
                 "-o", str(tmp_path / "o")]) == 2
    assert _err_lines(capsys) == ["error: model.layers.0.self_attn.q_proj: cannot export as ONNX qoperator: 3-bit "
                                  "codes: MatMulNBits is exported for 4 and 8 bits"]
    assert not (tmp_path / "o").exists()
