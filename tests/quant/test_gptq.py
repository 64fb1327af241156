"""GPTQ as a method on the layer walk, on the real SmolLM2 (its first 4 blocks)."""
import copy

import pytest
import torch

from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.layers import WeightOnlyLinear


@pytest.fixture(scope="module")
def calib(frozen_calib):
    return frozen_calib(2, 64)                                             # 2 x 64 frozen WikiText-2 valid


def _layer_err(res):
    return sum(r.output_rel_mse for r in res.report.layers) / len(res.report.layers)


def test_gptq_beats_rtn_on_the_same_grid(smollm2_4, calib):
    rtn, gptq = copy.deepcopy(smollm2_4[0]), copy.deepcopy(smollm2_4[0])
    r = quantize(rtn, "rtn", calib, progress=False, bits=3, group_size=-1)
    g = quantize(gptq, "gptq", calib, progress=False, bits=3, group_size=-1)
    assert _layer_err(g) < 0.5 * _layer_err(r)


def test_act_order_checkpoint_reloads_identically(tmp_path, smollm2_4, calib, frozen_test_ids):
    """act-order with g=128 on 576-wide inputs: permuted, ragged groups; saved g_idx reproduces outputs."""
    model = copy.deepcopy(smollm2_4[0])
    res = quantize(model, "gptq", calib, progress=False, bits=4, group_size=128, act_order=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, WeightOnlyLinear) and q.g_idx is not None
    assert not torch.equal(q.g_idx, torch.sort(q.g_idx).values)          # really permuted groups
    out = res.save(model, smollm2_4[1], tmp_path / "gptq", save_dtype=None)
    loaded, _ = load(out)
    ids = frozen_test_ids[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_deterministic(smollm2_4, calib):
    a, b = copy.deepcopy(smollm2_4[0]), copy.deepcopy(smollm2_4[0])
    quantize(a, "gptq", calib, progress=False, bits=4, group_size=64)
    quantize(b, "gptq", calib, progress=False, bits=4, group_size=64)
    for (n, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), n


def _slow_true_sequential_gptq(model, windows, **opts):
    """The reference's procedure, written out: for every group of every block, a whole-block forward over
    all windows feeds a Hessian per Linear; quantize the group; the block's full output feeds the next."""
    from lowbit.quant.gptq_core import HessianAccumulator
    from lowbit.layers import swap_linear
    from lowbit.quant.registry import get_method
    from lowbit.quant.walk import BlockContext, block_inputs

    method, layout = get_method("gptq", **opts), model.arch.layout
    xs, kw = block_inputs(model, windows)                                  # [N, S, d]
    cos, sin = kw["cos"][: xs.shape[0]], kw["sin"][: xs.shape[0]]
    with torch.no_grad():
        for i, block in enumerate(model.get_submodule(layout.blocks)):
            ctx = BlockContext(i, block, model.arch)
            for group in layout.sequential:
                hs = {n: HessianAccumulator() for n in group}
                hooks = [block.get_submodule(n).register_forward_pre_hook(
                    lambda _m, a, _h=hs[n]: [_h.update(a[0]), None][1]) for n in group]   # None: keep the input
                block(xs, cos, sin)
                for h in hooks:
                    h.remove()
                for n in group:
                    swap_linear(block, n, method.quantize_linear(ctx, n, block.get_submodule(n), hs[n]).layer)
            xs = block(xs, cos, sin)


@pytest.mark.parametrize("opts", [dict(bits=3, group_size=-1), dict(bits=4, group_size=128, act_order=True)])
def test_staged_walk_equals_whole_block_passes(smollm2_4, calib, opts):
    """The walk runs one residual stage per group, shares q/k/v's (gate/up's) Hessian and reuses o_proj's
    captured inputs for the attention output: the codes equal a whole-block pass per group's."""
    fast, slow = copy.deepcopy(smollm2_4[0]), copy.deepcopy(smollm2_4[0])
    quantize(fast, "gptq", calib, progress=False, **opts)
    _slow_true_sequential_gptq(slow, calib.windows, **opts)
    bufs = dict(slow.named_buffers())
    assert sum(isinstance(m, WeightOnlyLinear) for m in fast.modules()) == 4 * 7
    for n, x in fast.named_buffers():
        assert torch.equal(x, bufs[n]), n


def test_static_groups_act_order_stores_no_g_idx(smollm2_4, calib):
    """act-order with static groups (compressed-tensors actorder="weight"): permuted processing, contiguous
    groups, so g=64 on 576/1536-wide inputs gives plain grouped layers; the error stays near plain GPTQ's."""
    plain, static = copy.deepcopy(smollm2_4[0]), copy.deepcopy(smollm2_4[0])
    p = quantize(plain, "gptq", calib, progress=False, bits=4, group_size=64)
    s = quantize(static, "gptq", calib, progress=False, bits=4, group_size=64, act_order=True, static_groups=True)
    layers = [m for m in static.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 4 * 7
    assert all(m.g_idx is None and not m.act_order for m in layers)
    err_s, err_p = _layer_err(s), _layer_err(p)
    assert 0 < err_s < 1.5 * err_p, (err_s, err_p)
