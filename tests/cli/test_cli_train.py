"""`lowbit qat` and `lowbit distill` end to end on the real default model (a step each: the numbers are the
benchmark's job), and their one-line refusals before any training."""
from __future__ import annotations

import pytest

from lowbit.cli.main import main


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_qat_self_data_writes_a_loadable_quantized_checkpoint(tmp_path):
    import lowbit
    from lowbit.layers import WeightOnlyLinear
    from lowbit.models.checkpoint import read_qconfig

    out = tmp_path / "qat"
    assert main(["qat", "--data", "self", "--bits", "4", "--group-size", "32", "--zero-point", "float",
                 "--steps", "1", "--batch-size", "1", "--seqlen", "16", "--self-samples", "1", "-o", str(out)]) == 0
    q = read_qconfig(out)
    assert q["method"]["method"] == "qat" and q["calibration"]["source"] == "self" and len(q["modules"]) == 210
    model, _ = lowbit.load(str(out))
    assert isinstance(model.model.layers[29].mlp.down_proj, WeightOnlyLinear)
    assert model.model.layers[29].mlp.down_proj.spec.tag == "int4-fzp-g32"


def test_distill_every_other_block_writes_a_shallow_student(tmp_path, calib_path):
    import lowbit

    out = tmp_path / "student"
    assert main(["distill", "--student-blocks", "every-15", "--data", str(calib_path), "--steps", "1",
                 "--batch-size", "1", "--seqlen", "16", "-o", str(out)]) == 0
    model, _ = lowbit.load(str(out))
    assert model.config.num_layers == 2


@pytest.mark.parametrize("argv,needle", [
    (["qat", "--data", "nope.txt"], "error: --data nope.txt: no such file (or pass --data self)"),
    (["qat", "--data", "self", "--act-bits", "4"], "error: --act-bits: 0 (weight-only) or 8"),
    (["qat", "--data", "self", "--act-bits", "8", "--format", "gptq"], "error: --act-bits 8: the int8-activation"),
    (["qat", "--data", "self", "--steps", "0"], "error: --steps: must be > 0"),
    (["distill", "--student-blocks", "0,2", "--data", "nope.txt"], "error: --data nope.txt: no such file"),
    (["distill", "--student-blocks", "0,2", "--data", "self", "--mode", "black", "--prompt-len", "600"],
     "error: --prompt-len 600: must be below --seqlen 512"),
])
def test_training_refusals_are_one_line(tmp_path, capsys, argv, needle):
    assert main([*argv, "-o", str(tmp_path / "out")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(needle), lines
    assert not (tmp_path / "out").exists()


def test_distill_bad_blocks_and_existing_output(tmp_path, capsys, calib_path):
    assert main(["distill", "--student-blocks", "0,40", "--data", str(calib_path), "-o", str(tmp_path / "o")]) == 2
    assert "error: --student-blocks '0,40': indices must lie in [0, 29]" in _err_lines(capsys)[0]
    (tmp_path / "o").mkdir()
    assert main(["qat", "--data", "self", "-o", str(tmp_path / "o")]) == 2
    assert _err_lines(capsys)[0].startswith(f"error: -o {tmp_path / 'o'}: already exists")
