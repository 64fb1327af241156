"""ZeroQuant: group-wise W4 + per-token A8 layers, and layer-by-layer knowledge distillation (LKD) on SmolLM2.

LKD trains one block at a time (~0.1 s per step here), so the SmolLM2 tests quantize only the first blocks
(a view of the model sharing its block modules; the other blocks stay float) and evaluate the whole model.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import logits as _logits

from lowbit.errors import LowbitError
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.kernels.int8_matmul import ACT_QUANT
from lowbit.layers import FakeQuantLinear, WeightOnlyLinear, build_layer
from lowbit.kernels.primitives import fake_quantize_weight as quantize_weight
from lowbit.models.arch import LLAMA
from lowbit.kernels.primitives import QuantSpec
from lowbit.quant.registry import get_method
from lowbit.quant.walk import BlockContext

W4G128 = QuantSpec(bits=4, symmetric=True, group_size=128)
LKD = dict(lkd_steps=40, lkd_lr=2e-4, lkd_batch=2)


def _first_blocks(model, k: int, copy_blocks: bool = False):
    """A view of `model` whose decoder has only its first k blocks (config.num_layers = k): the same modules,
    so quantizing the view quantizes those blocks of `model` in place, the other blocks staying float.
    copy_blocks: the view gets copies of those k blocks instead, and `model` is left untouched."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    blocks = list(model.model.layers)[:k]
    inner.layers = nn.ModuleList([copy.deepcopy(b) for b in blocks] if copy_blocks else blocks)
    view.model = inner
    view.config = dataclasses.replace(model.config, num_layers=k)
    return view


def _splice(model, head):
    """A view of `model` (the float SmolLM2) whose first blocks are head's (quantized) ones."""
    view = _first_blocks(model, model.config.num_layers)
    k = len(head.model.layers)
    view.model.layers = nn.ModuleList(list(head.model.layers) + list(model.model.layers)[k:])
    return view


def test_weight_grid_is_the_packed_layers_grid():
    """The simulated weight is exactly what a packed W4 g128 WeightOnlyLinear holds (576 inputs: four groups
    of 128 and a short last group of 64)."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 40, bias=False)
    packed = WeightOnlyLinear.from_linear(lin, W4G128, dtype=torch.float32)
    assert torch.equal(quantize_weight(lin.weight.detach(), W4G128), packed.dequantized_weight())


def test_layer_is_w4_weights_and_per_token_int8_activations():
    torch.manual_seed(1)
    lin = nn.Linear(256, 48)
    m = get_method("zeroquant")
    ctx = BlockContext(0, nn.Module(), LLAMA)
    layer = m.quantize_linear(ctx, "mlp.up_proj", lin, None).layer
    assert isinstance(layer, FakeQuantLinear) and layer.spec == W4G128 and layer.act == "int8"
    x = torch.randn(2, 5, 256)
    quant, dequant = ACT_QUANT["int8"]
    xq = dequant(*quant(x.reshape(-1, 256), None)).reshape(x.shape)
    assert torch.equal(layer(x), F.linear(xq, quantize_weight(lin.weight.detach(), W4G128), lin.bias))
    twin = build_layer(json.loads(json.dumps(layer.layer_config())), device="meta")
    twin.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(twin(x), layer(x))
    # The paper's W4/8 mix: 8-bit attention projections; act_bits=16 leaves activations in float.
    m8 = get_method("zeroquant", attn_bits=8, act_bits=16)
    assert m8.quantize_linear(ctx, "self_attn.q_proj", lin, None).layer.spec.bits == 8
    assert m8.quantize_linear(ctx, "mlp.up_proj", lin, None).layer.act is None


def test_bad_options():
    with pytest.raises(LowbitError, match="act-bits"):
        get_method("zeroquant", act_bits=4)
    with pytest.raises(LowbitError, match="bits"):
        get_method("zeroquant", bits=9)
    with pytest.raises(LowbitError, match="lkd-steps"):
        get_method("zeroquant", lkd_steps=-1)
    with pytest.raises(LowbitError, match="needs calibration"):
        quantize(nn.Module(), "zeroquant", None, lkd_steps=10)


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def calib(frozen_calib):
    return frozen_calib(4, 32)                                             # 4 x 32 frozen WikiText-2 valid


@pytest.fixture(scope="module")
def heldout(frozen_test_ids):
    return frozen_test_ids[:256].view(2, 128)                              # WikiText-2 test, not calibration


def _zeroquant_first_blocks(smollm2, calib, k, **opts):
    """(SmolLM2 with its first k blocks ZeroQuant-quantized, those k blocks alone as a model, result);
    smollm2's own blocks are not touched."""
    head = _first_blocks(smollm2[0], k, copy_blocks=True)
    res = quantize(head, "zeroquant", calib, progress=False, **opts)
    return _splice(smollm2[0], head), head, res


@pytest.fixture(scope="module")
def rtn(smollm2, calib):
    return _zeroquant_first_blocks(smollm2, calib, 2)


@pytest.fixture(scope="module")
def lkd(smollm2, calib):
    return _zeroquant_first_blocks(smollm2, calib, 2, **LKD)


def _hidden(model, ids, k=2):
    """The residual stream after the model's first k decoder blocks: ids [W, S] -> [W, S, d]."""
    with torch.no_grad():
        x, cos, sin, _ = model.embed(ids)
        for block in list(model.model.layers)[:k]:
            x = block(x, cos, sin)
    return x


@pytest.fixture(scope="module")
def float_hidden(smollm2, heldout):
    return _hidden(smollm2[0], heldout)


def _heldout_err(head, heldout, float_hidden) -> float:
    """Relative squared error of the quantized blocks' output against the float blocks', on held-out text."""
    return ((_hidden(head, heldout) - float_hidden).pow(2).sum() / float_hidden.pow(2).sum()).item()


def test_lkd_lowers_each_blocks_output_error(rtn, lkd):
    """On the calibration inputs, every block's output MSE against the float block drops from the
    round-to-nearest block's (mse_before: the same block before training, on the same inputs); measured
    0.071 -> 0.017 and 0.094 -> 0.029 with 40 steps of 2 windows x 32 tokens."""
    assert sum(isinstance(m, FakeQuantLinear) for m in lkd[0].modules()) == 14
    log = lkd[2].report.blocks
    assert [e["block"] for e in log] == [0, 1] and not any(e["reverted"] for e in log)
    for e in log:
        assert e["mse_after"] < 0.5 * e["mse_before"], e
        assert e["last_loss"] < e["first_loss"]
    extra = lkd[2].report.layers[0].extra                               # the walk report carries it too
    assert extra["lkd_mse_after"] == log[0]["mse_after"] and rtn[2].report.layers[0].extra == {}


def test_lkd_brings_w4_closer_to_float(rtn, lkd, float_hidden, heldout):
    """On held-out text (2 x 128 WikiText-2 test tokens) the two W4 g128 + A8 blocks' output is closer to the
    float blocks' after LKD than after round-to-nearest: error ratio LKD/RTN measured 0.70 (0.68-0.82 over
    calibration seeds, windows and library sets; benchmarks/results/test_margins.md). KL from the float model on
    those 256 tokens does not order them reliably (LKD/RTN 0.59 here, 0.57-0.94 over seeds and windows)."""
    err = {name: _heldout_err(q[1], heldout, float_hidden) for name, q in (("rtn", rtn), ("lkd", lkd))}
    assert err["lkd"] < err["rtn"], err


def test_lkd_brings_w3_closer_to_float(smollm2, calib, float_hidden, heldout):
    """W3 g128 + A8 in blocks 0-1, LKD 30 steps: each block's output MSE on the calibration inputs drops below
    half of round-to-nearest's (worst block measured 0.29, at most 0.32), and on held-out text the two
    blocks' output is closer to the float blocks' (LKD/RTN 0.76, 0.68-0.78). Held-out perplexity (39.0 float,
    55.4 RTN, 48.4 LKD here) does not order them reliably on 2 x 128 tokens (LKD/RTN 0.83-1.01 over seeds and
    windows); benchmarks/quant_table.py compares LKD and RTN by perplexity on the whole model and text."""
    runs = {"rtn": _zeroquant_first_blocks(smollm2, calib, 2, bits=3),
            "lkd": _zeroquant_first_blocks(smollm2, calib, 2, bits=3, **{**LKD, "lkd_steps": 30})}
    log = runs["lkd"][2].report.blocks
    assert len(log) == 2 and all(e["mse_after"] < 0.5 * e["mse_before"] for e in log), log
    err = {name: _heldout_err(q[1], heldout, float_hidden) for name, q in runs.items()}
    assert err["lkd"] < err["rtn"], err


def test_lkd_is_deterministic(smollm2, calib):
    """Same seed -> the same trained block, tensor for tensor."""
    runs = [_zeroquant_first_blocks(smollm2, calib, 1, **{**LKD, "lkd_steps": 8, "lkd_seed": 3})[1:]
            for _ in range(2)]
    (a, ra), (b, rb) = runs
    sa, sb = a.model.layers[0].state_dict(), b.model.layers[0].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["input_layernorm.weight"], smollm2[0].model.layers[0].input_layernorm.weight)
    drop = lambda e: {k: v for k, v in e.items() if k != "seconds"}  # noqa: E731
    assert drop(ra.report.blocks[0]) == drop(rb.report.blocks[0])


def test_lkd_on_the_float_models_hidden_states(smollm2, calib):
    """lkd_inputs="float" (the paper's LKD): every block is distilled on the float model's hidden states, so
    the last block's teacher outputs are exactly the float model's (the walk itself feeds quantized ones)."""
    _, head, res = _zeroquant_first_blocks(smollm2, calib, 2, **{**LKD, "lkd_steps": 4, "lkd_inputs": "float"})
    float_head = _first_blocks(smollm2[0], 2)
    with torch.no_grad():
        x, cos, sin, _ = float_head.embed(calib.windows)
        for block in float_head.model.layers:
            x = block(x, cos, sin)
    assert torch.allclose(res.method._xf, x, rtol=1e-5, atol=1e-4)
    assert len(res.report.blocks) == 2


def test_zeroquant_save_load_identical_logits(tmp_path, smollm2, lkd, heldout):
    """The two LKD-trained blocks alone (embedding, 2 blocks, head) through a checkpoint."""
    _, head, res = lkd
    out = res.save(head, smollm2[1], tmp_path / "q", save_dtype=None)
    qcfg = json.loads((out / "quantization_config.json").read_text())
    assert qcfg["method"]["method"] == "zeroquant" and qcfg["method"]["lkd_steps"] == LKD["lkd_steps"]
    assert len(qcfg["modules"]) == 14
    assert all(c["kind"] == "fake" and c["act"] == "int8" and c["spec"]["bits"] == 4 for c in qcfg["modules"].values())
    loaded, _ = load(out)
    assert loaded.config.num_layers == 2
    probe = heldout[:, :48]
    assert torch.equal(_logits(loaded, probe), _logits(head, probe))
