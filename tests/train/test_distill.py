"""Distillation (lowbit.train.distill, losses) against direct definitions: the losses in float64, the
shallow student as the teacher's own blocks composed by hand, the block alignment, black-box data built
from the teacher's samples, and a short run on a real 2-block student that saves and loads."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.distill import (DistillConfig, aligned_targets, forward_hidden, parse_blocks, run_distill,
                                  shallow_copy)
from lowbit.train.losses import cross_entropy, hidden_mse, kl_div


def test_kl_div_is_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g, dtype=torch.float64), torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    for temp in (1.0, 2.0):
        p, q = (t / temp).softmax(-1), (s / temp).softmax(-1)
        fwd = (p * (p.log() - q.log())).sum(-1).mean() * temp ** 2
        rev = (q * (q.log() - p.log())).sum(-1).mean() * temp ** 2
        assert torch.allclose(kl_div(s, t, temp).double(), fwd, rtol=1e-5)
        assert torch.allclose(kl_div(s, t, temp, reverse=True).double(), rev, rtol=1e-5)
    assert kl_div(t, t).abs() < 1e-6


def test_cross_entropy_and_hidden_mse():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    want = -sum(logits[b, i].log_softmax(-1)[ids[b, i + 1]] for b in range(2) for i in range(4)) / 8
    assert torch.allclose(cross_entropy(logits, ids), want, rtol=1e-5)
    hs, ht = [torch.randn(2, 5, 4, generator=g) for _ in range(2)], [torch.randn(2, 5, 4, generator=g) for _ in range(2)]
    want = sum(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean() for a, b in zip(hs, ht)) / 2
    assert torch.allclose(hidden_mse(hs, ht), want, rtol=1e-5)


def test_blocks_and_alignment():
    assert parse_blocks("every-2", 30) == list(range(0, 30, 2)) and parse_blocks("4, 0,2", 6) == [0, 2, 4]
    assert aligned_targets([0, 2, 4], 6) == [1, 3, 5] and aligned_targets([0, 1, 5], 8) == [0, 4, 7]
    for bad in ("x", "0,40", "", "every-x"):
        with pytest.raises(LowbitError, match="--student-blocks"):
            parse_blocks(bad, 30)


def test_shallow_student_is_the_teachers_blocks_composed(smollm2):
    teacher = smollm2[0]
    student = shallow_copy(teacher, [0, 3, 7])
    ids = torch.arange(200, 216)[None]
    with torch.no_grad():
        x, cos, sin, mask = teacher.embed(ids)
        for b in (0, 3, 7):
            x = teacher.model.layers[b](x, cos, sin, None, mask)
        want = teacher.head(x)
        logits, hidden = forward_hidden(student, ids)
        assert torch.equal(student(ids), want) and torch.equal(logits, want) and len(hidden) == 3
        # the student keeps its own cache indices: cached decoding equals the full forward
        cache = student.new_cache(1, 16)
        step = torch.cat([student(ids[:, :10], cache=cache), student(ids[:, 10:], cache=cache)], 1)
    assert torch.allclose(step, want, rtol=1e-4, atol=1e-4)
    assert student.config.num_layers == 3 and teacher.config.num_layers == 30


def test_black_box_trains_on_the_teachers_continuations(smollm2, calib_path):
    from lowbit.train.distill import distill_batches

    teacher = shallow_copy(smollm2[0], [0, 1])
    cfg = DistillConfig(mode="black", seqlen=12, prompt_len=4, black_samples=2, batch_size=2, top_k=1)
    batches, desc, first = distill_batches(teacher, smollm2[1], cfg, str(calib_path), progress=False)
    seqs = next(batches)
    assert first == 4 and seqs.shape == (2, 12) and desc["teacher_sequences"] == 2
    with torch.no_grad():
        logits = teacher(seqs)
    assert torch.equal(seqs[:, 4:], logits[:, 3:-1].argmax(-1))   # top-1 sampling: the teacher's own argmax


def test_white_box_run_saves_and_loads(smollm2, calib_path, tmp_path):
    from lowbit.models.loader import load

    teacher = shallow_copy(smollm2[0], [0, 1, 2, 3])
    student = shallow_copy(teacher, [0, 2])
    cfg = DistillConfig(mode="white", feature_loss=True, steps=2, batch_size=1, seqlen=16, lr=1e-4)
    log, desc = run_distill(teacher, student, smollm2[1], cfg, str(calib_path), progress=False)
    assert len(log.losses) == 2 and all(torch.isfinite(torch.tensor(log.losses)))
    out = student.save_pretrained(tmp_path / "s", smollm2[1], method={"method": "distill", **cfg.to_dict()},
                                  calibration=desc, save_dtype=None)
    back, _ = load(out, dtype="fp32")
    ids = torch.arange(300, 320)[None]
    assert back.config.num_layers == 2
    with torch.no_grad():
        assert torch.equal(back(ids), student(ids))
    from lowbit.models.llama import LlamaForCausalLM
    with pytest.raises(LowbitError, match="--feature-loss"):   # a student without a block map cannot align
        run_distill(teacher, LlamaForCausalLM(teacher.config), smollm2[1], cfg, str(calib_path), progress=False)


def test_a_quantized_student_trains_through_qat_layers_and_stays_quantized(smollm2, calib_path):
    from lowbit.kernels.primitives import QuantSpec
    from lowbit.layers import WeightOnlyLinear, swap_linear
    from lowbit.train.qat import block_linears

    teacher = shallow_copy(smollm2[0], [0, 1])
    student = shallow_copy(teacher, [0, 1])
    spec = QuantSpec(4, False, 64)
    for name, m in block_linears(student).items():
        swap_linear(student, name, WeightOnlyLinear.from_linear(m, spec))
    before = student.model.layers[1].mlp.up_proj.codes().clone()
    cfg = DistillConfig(mode="white", steps=3, batch_size=1, seqlen=32, lr=1e-3)
    run_distill(teacher, student, smollm2[1], cfg, str(calib_path), progress=False)
    after = student.model.layers[1].mlp.up_proj
    assert isinstance(after, WeightOnlyLinear) and after.spec == spec
    assert not torch.equal(after.codes(), before)      # training moved some weights to other codes
