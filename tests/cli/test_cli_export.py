"""`lowbit quantize --format` and `lowbit export`: a hub-format directory written, read back by `lowbit eval`,
converted between formats with identical tensors, and every refusal one line before any work or output."""
import json

import pytest
from safetensors.torch import load_file

from lowbit.cli.main import main


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_quantize_as_compressed_tensors_then_export_round_trip(tmp_path, wiki_test_path, capsys):
    ct = tmp_path / "ct"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "64", "--sym",
                 "--format", "compressed-tensors", "-o", str(ct)]) == 0
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert (ct / "tokenizer.json").exists()
    out = tmp_path / "eval.json"
    assert main(["eval", str(ct), "--text", str(wiki_test_path), "--seqlen", "128", "--windows", "1",
                 "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["perplexity"] > 1
    # compressed-tensors -> gptq -> compressed-tensors: the same bytes
    assert main(["export", str(ct), "--format", "gptq", "-o", str(tmp_path / "gptq")]) == 0
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64
    assert main(["export", str(tmp_path / "gptq"), "--format", "compressed-tensors", "-o", str(tmp_path / "ct2")]) == 0
    a, b = load_file(str(ct / "model.safetensors")), load_file(str(tmp_path / "ct2" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--method", "llm-int8", "--format", "gptq"], "--format gptq cannot hold --method llm-int8"),
    (["quantize", "--method", "w8a8", "--format", "awq"], "use --format compressed-tensors or lowbit"),
    (["quantize", "--method", "rtn", "--group-size", "128", "--format", "compressed-tensors"],
     "not a multiple of --group-size 128"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    assert main(argv + ["-o", str(out)]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and needle in lines[0], lines
    assert not out.exists()


def test_export_of_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["export", str(tmp_path / "x"), "--format", "gptq", "-o", str(tmp_path / "o")]) == 2
    assert "not a directory" in _err_lines(capsys)[0]


def test_unknown_quant_method_is_one_line(tmp_path, capsys):
    from lowbit.config import ModelConfig
    from lowbit.models.arch import config_to_hf
    cfg = config_to_hf(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                   num_kv_heads=1))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    d = tmp_path / "bnb"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "t.txt").write_text("hello")
    assert main(["eval", str(d), "--text", str(tmp_path / "t.txt")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "quant_method 'bitsandbytes' is not one lowbit reads" in lines[0], lines


def test_export_gguf_of_the_default_model(tmp_path, capsys):
    """`lowbit export --format gguf` with no MODEL: the default model, one line naming what was written."""
    import gguf

    out = tmp_path / "smollm2-q4_1.gguf"
    assert main(["export", "--format", "gguf", "--type", "Q4_1", "-o", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "as GGUF Q4_1:" in printed and "272 tensors (61 F32, 210 Q4_1, 1 Q8_0)" in printed, printed
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 3 and len(r.tensors) == 272
    assert main(["export", "--format", "gguf", "-o", str(out)]) == 2          # exists: refused without --force
    assert "already exists" in capsys.readouterr().err
    # --head-type F32: the head (the tied embedding) as lowbit runs it, read back unchanged
    assert main(["export", "--format", "gguf", "--type", "Q4_1", "--head-type", "F32", "--force", "-o", str(out)]) == 0
    assert "272 tensors (62 F32, 210 Q4_1)" in " ".join(capsys.readouterr().out.split())
    emb = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.F32
