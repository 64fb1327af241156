"""compare.run on the real model cut to its first two blocks: resuming, cached calibrated checkpoints and rows
taken over from another comparison give the same numbers as scoring from scratch."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from lowbit import compare
from lowbit.text import eval_windows
from lowbit.quant.api import calibration_windows

CANDS = [compare.Candidate("rtn-w4-g32", "rtn", dict(bits=4, group_size=32)),
         compare.Candidate("w8a8-static", "w8a8", dict(act_scheme="static"))]


@pytest.fixture(scope="module")
def small(smollm2, wiki_ids, calib_path):
    model, tok = smollm2
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:2]
    m.config = dataclasses.replace(m.config, num_layers=2)
    return m, eval_windows(wiki_ids, 64, 3), calibration_windows(tok, calib_path, 2, 64, seed=0)


def rows(state):
    return {r["config"]: (r["perplexity"], r["kl"], r["top1_agreement"], r["windows"]) for r in compare.summary(state)}


def test_resume_with_cached_checkpoint_equals_one_pass(small, tmp_path):
    model, windows, calib = small
    meta = {"text": "wiki"}
    whole = compare.run(model, CANDS, windows, calib, tmp_path / "a", "t", meta, progress=False)
    part = compare.run(model, CANDS, windows[:2], calib, tmp_path / "b", "t", meta, progress=False,
                       cache_models=True)
    assert rows(part)["w8a8-static"][3] == 2
    assert (tmp_path / "b" / "models" / "w8a8-static" / "build_info.json").is_file()   # calibrated: cached
    assert not (tmp_path / "b" / "models" / "rtn-w4-g32").exists()                     # RTN: rebuilt, cheap
    resumed = compare.run(model, CANDS, windows, calib, tmp_path / "b", "t", meta, progress=False,
                          cache_models=True)                                           # loads the checkpoint
    got, want = rows(resumed), rows(whole)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name


def test_seeded_rows_are_not_scored_again(small, tmp_path):
    model, windows, calib = small
    meta = {"text": "wiki"}
    first = compare.run(model, CANDS[:1], windows, calib, tmp_path / "a", "t", meta, progress=False)
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    seed = {"rtn-w4-g32": (state["results"]["rtn-w4-g32"], state["info"]["rtn-w4-g32"])}
    second = compare.run(model, CANDS[:1], windows, calib, tmp_path / "c", "t", meta, progress=False, seed=seed)
    assert second["info"]["rtn-w4-g32"]["reused"] is True
    assert rows(second)["rtn-w4-g32"] == rows(first)["rtn-w4-g32"]


def test_rows_calibrated_elsewhere_are_marked(small, tmp_path):
    """A cached checkpoint calibrated on another machine (build_info's calibrated_on) keeps that machine's cost
    figures, and the table marks them."""
    model, windows, calib = small
    cand = compare.Candidate("gptq-w4", "gptq", dict(bits=4, group_size=-1))
    compare.build(model, cand, calib, cache=tmp_path / "models")
    info_path = tmp_path / "models" / "gptq-w4" / "build_info.json"
    info_path.write_text(json.dumps(dict(json.loads(info_path.read_text()), calibrated_on="GPU X")))
    state = compare.run(model, [cand], windows[:1], calib, tmp_path, "t", {}, progress=False, cache_models=True)
    md = compare.markdown(state, "t")
    row = next(line for line in md.splitlines() if line.startswith("| gptq-w4 |"))
    assert "†" in row and "† calibrated on GPU X" in md
    assert "†" not in next(line for line in md.splitlines() if line.startswith("| base |"))
