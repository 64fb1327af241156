"""SmoothQuant: the smoothing-scale formula, function-preserving folding, α search, and W8A8 accuracy vs naive
W8A8 on the real SmolLM2 (the fast end-to-end tests quantize its first K blocks; the slow one all 30)."""
import copy

import pytest
import torch
from helpers import copy_first_blocks, mean_output_rel_mse, quantize_first_blocks
from helpers import logits as _logits

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import evaluate
from lowbit.text import eval_windows
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.layers import Int8Linear
from lowbit.quant.methods.smoothquant import ALPHA_GRID, smooth_scales
from lowbit.quant.registry import get_method
from lowbit.quant.walk import BlockContext, block_inputs

K = 4                                # blocks quantized by the fast end-to-end tests


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def calib(frozen_calib):
    return frozen_calib(2, 128)                                            # 2 x 128 frozen WikiText-2 valid


@pytest.fixture(scope="module")
def probe(frozen_test_ids):
    return frozen_test_ids[1000:1096].view(2, 48)                          # [2, 48]


# ----------------------------------------------------------------------------- the formula

@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_smooth_scales_match_the_paper_equation(alpha):
    """s_j = max|X_j|^α / max|W_j|^(1-α), max|W_j| over all consumers' column j, against float64 loops."""
    g = torch.Generator().manual_seed(0)
    act = torch.rand(40, generator=g) * 50 + 0.01
    act[[3, 17]] = torch.tensor([400.0, 900.0])                             # outlier channels
    act[29] = 0.0                                                           # a channel never seen non-zero
    ws = [torch.randn(16, 40, generator=g) * 0.1, torch.randn(8, 40, generator=g) * 0.3]
    s = smooth_scales(act, ws, alpha)
    expect = []
    for j in range(40):
        wmax = max(abs(float(w[o, j])) for w in ws for o in range(w.shape[0]))
        a = float(act[j])
        expect.append(1.0 if a == 0 else max(a ** alpha / max(wmax, 1e-5) ** (1 - alpha), 1e-5))
    expect = torch.tensor(expect, dtype=torch.float64)
    assert s.dtype == torch.float32 and s.shape == (40,)
    torch.testing.assert_close(s.double(), expect, rtol=2e-6, atol=0)
    # What smoothing is for: after X/s and W·s, channel j's activation range is max|X_j|^(1-α)·max|W_j|^(1-α)
    # ... and the weight range max|X_j|^α·max|W_j|^α: α moves the difficulty from one to the other.
    if alpha == 0.5:
        wmax = torch.stack([w.abs().amax(0) for w in ws]).amax(0)
        seen = act > 0
        torch.testing.assert_close((act / s)[seen], (wmax * s)[seen], rtol=1e-5, atol=0)


def test_alpha_option_parsing():
    assert get_method("smoothquant", alpha="auto").cfg.alpha == "auto"
    assert get_method("smoothquant", alpha="0.75").cfg.alpha == 0.75          # as a CLI string
    for bad in (1.5, -0.1, "strong"):
        with pytest.raises(LowbitError, match="--alpha"):
            get_method("smoothquant", alpha=bad)
    with pytest.raises(LowbitError, match="--act-scheme"):
        get_method("smoothquant", act_scheme="per-channel")


# ----------------------------------------------------------------------------- folding

@pytest.mark.parametrize("linear_producers", [False, True])
def test_smoothing_keeps_the_float_model(smollm2, calib, probe, linear_producers):
    """SmoothQuant's scales folded into SmolLM2's first 8 blocks (no quantization; the same code runs for every
    block) leave the model's logits unchanged. linear_producers=True also folds into up_proj's rows."""
    model = copy_first_blocks(smollm2[0], 8)
    method = get_method("smoothquant", linear_producers=linear_producers)
    xs, kw = block_inputs(model, calib.windows[:1, :64])                          # one 64-token window
    for i, block in enumerate(list(model.model.layers)[:8]):
        ctx = BlockContext(i, block, model.arch, "cpu", kw)
        method.prepare_block(ctx, xs)
        xs = ctx.run(xs)
    orig = dict(smollm2[0].named_parameters())
    params = dict(model.named_parameters())
    moved = {n for n in params if not torch.equal(params[n], orig[n])}
    for i in range(8):
        p = f"model.layers.{i}."
        assert {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"} <= moved
        assert (p + "mlp.up_proj.weight" in moved) and ((p + "mlp.down_proj.weight" in moved) == linear_producers)
        assert p + "self_attn.o_proj.weight" not in moved                      # GQA: never smoothed
    ratio = torch.cat([(params[n] / orig[n]).abs() for n in moved if n.endswith("layernorm.weight")])
    assert ratio.max() > 5 and ratio.min() < 0.7                             # far from a no-op (measured 43, 0.51)
    rel = _rel(_logits(model, probe), _logits(smollm2[0], probe))
    assert rel <= 1e-5, rel


# ----------------------------------------------------------------------------- α search

def test_auto_alpha_search(smollm2, calib):
    """alpha="auto" evaluates 0.0..1.0 per block, keeps the least block-output error after W8A8 fake quant,
    and that beats W8A8 without smoothing on the same block."""
    model = copy_first_blocks(smollm2[0], 2)
    method = get_method("smoothquant", alpha="auto", act_scheme="static")
    xs, kw = block_inputs(model, calib.windows)
    for i, block in enumerate(list(model.model.layers)[:2]):
        ctx = BlockContext(i, block, model.arch, "cpu", kw)
        absmax, ref = method.channel_stats(ctx, xs)
        plain = method.block_error(ctx, [], absmax, 0.0, xs, ref)   # no smoothing, same W8A8
        h = method.prepare_block(ctx, xs).entry
        assert set(h["errors"]) == set(ALPHA_GRID)
        assert h["errors"][h["alpha"]] == min(h["errors"].values())
        assert h["errors"][h["alpha"]] < plain, (h, plain)
        xs = ctx.run(xs)                                                      # smoothed float block -> next inputs


# ----------------------------------------------------------------------------- end to end on SmolLM2

@pytest.fixture(scope="module")
def sq_vs_w8a8(smollm2, calib):
    out = {}
    for scheme in ("dynamic", "static"):
        for name in ("w8a8", "smoothquant"):
            model = copy_first_blocks(smollm2[0], K)
            out[name, scheme] = (model, quantize_first_blocks(model, name, calib, K, act_scheme=scheme))
    return out


SMOOTHED = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}     # the Linears whose inputs are smoothed


def _mean_mse(res, kinds) -> float:
    err = [r.output_rel_mse for r in res.report.layers if r.name.split(".")[-1] in kinds]
    return sum(err) / len(err)


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_smoothquant_beats_naive_w8a8(sq_vs_w8a8, scheme):
    """Per-layer output error against the float layer, first 4 blocks (benchmarks/results/test_margins.md has
    each ratio over calibration seeds and library sets). The smoothed Linears' error is about a quarter of naive
    W8A8's (SQ/naive measured 0.27 dynamic, 0.26 static; at most 0.28). Over all layers: 0.41 dynamic; static's
    all-layer mean is down_proj's (unsmoothed) error and moves with the calibration windows (0.80-0.98), so only
    the dynamic one is asserted. End to end on a few hundred tokens (logits error, KL) the ordering is within the
    noise (SQ/naive 0.4-1.4 over seeds and windows): that is the slow all-blocks test's and quant_table's."""
    (_, naive), (_, sq) = sq_vs_w8a8["w8a8", scheme], sq_vs_w8a8["smoothquant", scheme]
    assert all(r.kind == "Int8Linear" for r in sq.report.layers) and len(sq.report.layers) == K * 7
    smoothed = _mean_mse(sq, SMOOTHED), _mean_mse(naive, SMOOTHED)
    assert smoothed[0] < 0.5 * smoothed[1], smoothed
    if scheme == "dynamic":
        assert mean_output_rel_mse(sq) < 0.9 * mean_output_rel_mse(naive)
    for r in sq.report.layers:
        assert (r.extra["alpha"] == 0.5) == (r.name.split(".")[-1] in SMOOTHED)


def test_smoothquant_save_load_round_trip(tmp_path, smollm2, sq_vs_w8a8, probe):
    model, res = sq_vs_w8a8["smoothquant", "static"]
    out = res.save(model, smollm2[1], tmp_path / "sq", save_dtype=None)
    loaded, _ = load(out)
    q = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert len(q) == K * 7 and all(m.static_act for m in q)
    for name in ("input_layernorm", "post_attention_layernorm"):             # the folded norms come back
        w = getattr(loaded.model.layers[1], name).weight
        assert torch.equal(w, getattr(model.model.layers[1], name).weight)
        assert not torch.equal(w, getattr(smollm2[0].model.layers[1], name).weight)
    assert torch.equal(_logits(loaded, probe), _logits(model, probe))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_smoothquant_beats_naive_w8a8_on_all_blocks(smollm2, frozen_calib, frozen_test_ids, scheme):
    calib = frozen_calib(4, 128)
    windows = eval_windows(frozen_test_ids, 128, limit=2)
    mse, ppl = {}, {}
    for name in ("w8a8", "smoothquant"):
        model = copy.deepcopy(smollm2[0])
        res = quantize(model, name, calib, progress=False, act_scheme=scheme)
        mse[name], ppl[name] = mean_output_rel_mse(res), evaluate(model, windows, progress=False).perplexity
    # measured: output rel. MSE dynamic 3.9e-4 vs 1.27e-3, static 1.51e-2 vs 1.72e-2 (down_proj's unsmoothed
    # inputs dominate the static error: 0.10 for both); ppl (fp32 39.0) dynamic 39.4 vs 40.7, static 69.9 vs 77.4
    assert mse["smoothquant"] < 0.9 * mse["w8a8"] and ppl["smoothquant"] < ppl["w8a8"], (mse, ppl)
