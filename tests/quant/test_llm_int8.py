"""LLM.int8(): the mixed-precision decomposition layer against exact references, and `llm-int8` on SmolLM2."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import logits as _logits
from helpers import ppl_kl as _ppl_kl

from lowbit.errors import LowbitError
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.layers import LAYER_CLASSES, Int8Linear, build_layer
from lowbit.layers.mixed_int8 import MixedInt8Linear, outlier_columns
from lowbit.quant.registry import get_method

IN, OUT = 64, 24


def _grid_linear(in_f=IN, out_f=OUT, seed=0, bias=True) -> nn.Linear:
    """A Linear whose weight lies exactly on its own per-channel int8 grid: w = s_o * q, q integer in
    [-127, 127] with |q| = 127 in every row (so absmax / 127 = s_o exactly), s_o a power of two, bias a
    multiple of 2^-4: every product and partial sum below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_f, in_f), generator=g)
    q[:, 5] = 127 * torch.where(torch.rand(out_f, generator=g) < 0.5, -1, 1)
    s = 2.0 ** torch.randint(-8, -4, (out_f, 1), generator=g).float()
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(q * s)
        if bias:
            lin.bias.copy_(torch.randint(-16, 17, (out_f,), generator=g) / 16)
    return lin


def _grid_input(rows=10, in_f=IN, seed=1) -> torch.Tensor:
    """Integer inputs in [-5, 5] with one +-127 per row (in columns 0..3): per-token absmax 127 -> scale 1,
    so the int8 quantization is exact (as long as the threshold is above 127)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-5, 6, (rows, in_f), generator=g).float()
    x[torch.arange(rows), torch.arange(rows) % 4] = 127.0 * torch.where(torch.rand(rows, generator=g) < 0.5, -1, 1)
    return x


def _ref(x, lin):
    """float64 x W^T + b, rounded once to float32."""
    y = x.double() @ lin.weight.double().t()
    return (y + lin.bias.double() if lin.bias is not None else y).float()


def test_registered_and_rebuilt_from_config():
    assert LAYER_CLASSES["llm_int8"] is MixedInt8Linear
    lin = _grid_linear()
    layer = MixedInt8Linear.from_linear(lin, threshold=4.5, fp_cols=[7, 3, 7])
    cfg = json.loads(json.dumps(layer.layer_config()))
    assert cfg == {"kind": "llm_int8", "in_features": IN, "out_features": OUT, "bias": True, "dtype": "float32",
                   "threshold": 4.5, "n_fp_cols": 2}
    twin = build_layer(cfg, device="meta")
    twin.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(2, 3, IN) * 3
    assert torch.equal(twin(x), layer(x))
    assert layer.fp_cols.tolist() == [3, 7] and "threshold=4.5, n_fp_cols=2" in repr(layer)
    assert layer.nbytes() == OUT * IN + OUT * 4 + 2 * 4 + OUT * 2 * 4 + OUT * 4
    with pytest.raises(LowbitError, match="threshold"):
        MixedInt8Linear(IN, OUT, threshold=-1.0)
    with pytest.raises(LowbitError, match="fp_cols"):
        MixedInt8Linear.from_linear(lin, fp_cols=[IN])


def test_exact_inputs_give_the_float_matmul_bit_for_bit():
    """Weights on their int8 grid and inputs whose per-token quantization is exact: the int8 path is exact."""
    lin, x = _grid_linear(), _grid_input()
    layer = MixedInt8Linear.from_linear(lin, threshold=200.0)            # no outliers: all of it in int8
    assert torch.equal(layer(x), _ref(x, lin))
    assert torch.equal(layer.dequantized_weight(), lin.weight.detach())


def test_outlier_columns_take_the_float_path():
    """A column holding non-integer values far above the threshold (1000.37...) would wreck per-token int8;
    LLM.int8() sends it through the float path and stays at float rounding error, plain int8 does not."""
    lin, x = _grid_linear(), _grid_input()
    x[:, 11] = torch.linspace(-1000.37, 999.91, x.shape[0])              # an outlier feature dim
    x[3, 20] = -200.0                                                    # exactly at the threshold: outlier too
    layer = MixedInt8Linear.from_linear(lin, threshold=200.0)            # above the inputs' 127s
    assert outlier_columns(x, 200.0).tolist() == [11, 20]
    ref = _ref(x, lin)
    err = (layer(x) - ref).abs().max() / ref.abs().max()
    naive = (Int8Linear.from_linear(lin)(x) - ref).abs().max() / ref.abs().max()
    assert err < 1e-6 and naive > 1e-3, (err, naive)
    # The int8 half saw the outlier dims as zeros; the float half is exactly x[:, O] @ W[:, O]^T.
    acc, sx, cols = layer.int_accumulate(x)
    assert cols.tolist() == [11, 20] and torch.equal(sx, torch.ones_like(sx))
    x_in = x.clone()
    x_in[:, [11, 20]] = 0
    assert torch.equal(acc.float() * layer.w_scale.t() + lin.bias, _ref(x_in, lin))
    only = torch.zeros_like(x)
    only[:, 11] = x[:, 11]                                               # nothing but the outlier column
    assert torch.equal(layer(only), F.linear(x[:, 11:12], lin.weight[:, 11:12]) + lin.bias)


def test_kept_columns_use_the_original_weight():
    """An outlier dim in fp_cols multiplies the ORIGINAL weight column; others the int8-dequantized one."""
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT, bias=False)                                 # off-grid weights
    layer = MixedInt8Linear.from_linear(lin, fp_cols=[11])
    x = torch.zeros(4, IN)
    for j in (11, 12):
        xj = x.clone()
        xj[:, j] = torch.tensor([7.3, -50.1, 9.9, 1e3])
        col = lin.weight.detach()[:, j: j + 1]
        deq = Int8Linear.from_linear(lin).dequantized_weight()[:, j: j + 1]
        want = F.linear(xj[:, j: j + 1], col if j == 11 else deq)
        assert torch.equal(layer(xj), want), j
        assert not torch.equal(col, deq)


def test_int8_half_is_bit_exact_against_an_integer_reference():
    """Random float inputs with outliers: codes and int32 sums equal an independent numpy int64 computation."""
    torch.manual_seed(3)
    lin = nn.Linear(IN, OUT)
    x = (torch.randn(3, 7, IN) * 2).clamp(-5.9, 5.9)
    x[0, 2, 9], x[2, 5, 40] = 31.0, -8.5
    layer = MixedInt8Linear.from_linear(lin)
    xn, wn = x.reshape(-1, IN).numpy(), lin.weight.detach().numpy()
    w_scale = np.abs(wn).max(1, keepdims=True) / np.float32(127)
    assert np.array_equal(layer.qweight.numpy(), np.round(wn / w_scale).astype(np.int8))
    out_cols = np.flatnonzero((np.abs(xn) >= 6).any(0))
    xi = xn.copy()
    xi[:, out_cols] = 0
    sx = np.abs(xi).max(1, keepdims=True) / np.float32(127)
    qx = np.clip(np.round(xi / sx), -128, 127).astype(np.int64)
    acc_ref = qx @ layer.qweight.numpy().astype(np.int64).T
    acc, scale, cols = layer.int_accumulate(x)
    assert cols.tolist() == out_cols.tolist() == [9, 40]
    assert acc.dtype == torch.int32 and np.array_equal(acc.numpy(), acc_ref)
    assert np.array_equal(scale.numpy(), sx)


def test_threshold_zero_is_vector_wise_int8():
    """Without the decomposition the layer is exactly Int8Linear (per-token x per-channel int8)."""
    torch.manual_seed(4)
    lin = nn.Linear(IN, OUT)
    x = torch.randn(5, IN) * 4
    x[:, 3] = 40.0
    assert torch.equal(MixedInt8Linear.from_linear(lin, threshold=0.0)(x), Int8Linear.from_linear(lin)(x))
    half = MixedInt8Linear.from_linear(lin, fp_cols=[3]).half()
    assert half.w_scale.dtype == torch.float32 and half.layer_config()["dtype"] == "float16"
    assert half(x.half()).dtype == torch.float16


def test_method_options():
    assert get_method("llm-int8").cfg.threshold == 6.0
    with pytest.raises(LowbitError, match="threshold"):
        get_method("llm-int8", threshold=-2.0)
    with pytest.raises(LowbitError, match="option 'bits' does not apply"):
        get_method("llm-int8", bits=8)


# ----------------------------------------------------------------------------- SmolLM2

@pytest.fixture(scope="module")
def calib(frozen_calib):
    return frozen_calib(2, 64)                                             # 2 x 64 frozen WikiText-2 valid


@pytest.fixture(scope="module")
def windows(frozen_test_ids):
    return frozen_test_ids[:512].view(2, 256)                              # 2 x 256 WikiText-2 test tokens


@pytest.fixture(scope="module")
def llm_int8(smollm2, calib):
    model = copy.deepcopy(smollm2[0])
    return model, quantize(model, "llm-int8", calib, progress=False)


@pytest.fixture(scope="module")
def w8a8(smollm2, calib):
    model = copy.deepcopy(smollm2[0])
    return model, quantize(model, "w8a8", calib, progress=False)


def test_llm_int8_report_on_smollm2(llm_int8, w8a8):
    """Small per-layer output error, outlier dims found in some layers, half the fp16 bytes, and a lower
    error than naive per-token W8A8 (measured mean output rel. MSE 6.1e-4 vs 1.4e-3), far lower in the layers
    where it found outliers (sum 0.18 of naive's) and clearly worse in none of them (worst layer 1.06x naive's).
    benchmarks/results/test_margins.md has each ratio over calibration seeds and library sets; how many of those
    layers come out strictly better moves with the calibration windows (86-99%), so it is not asserted."""
    model, res = llm_int8
    layers = res.report.layers
    assert len(layers) == 210 and sum(isinstance(m, MixedInt8Linear) for m in model.modules()) == 210
    err = [r.output_rel_mse for r in layers]
    assert sum(err) / len(err) < 1e-3 and max(err) < 1e-2
    with_outliers = [r for r in layers if r.extra["outlier_fraction"] > 0]
    assert len(with_outliers) >= 20                                      # measured 91 of 210
    last_down = layers[-1]
    assert last_down.name == "mlp.down_proj" and last_down.extra["outlier_dims"] > 50   # measured 338 of 1536
    assert all(r.extra["outlier_value_fraction"] < 0.05 for r in layers)
    assert sum(r.stored_bytes for r in layers) < 0.56 * sum(r.fp16_bytes for r in layers)
    naive = [r.output_rel_mse for r in w8a8[1].report.layers]
    assert sum(err) < 0.6 * sum(naive)
    pairs = [(a.output_rel_mse, b.output_rel_mse) for a, b in zip(layers, w8a8[1].report.layers)
             if a.extra["outlier_fraction"] > 0]
    assert sum(a for a, _ in pairs) < 0.5 * sum(b for _, b in pairs)
    assert all(a < 1.5 * b for a, b in pairs), max(a / b for a, b in pairs)


def test_outlier_fraction_table(llm_int8):
    """The per-layer outlier fractions come out as a block x layer grid (what `lowbit quantize` prints)."""
    from rich.console import Console

    layers = llm_int8[1].report.layers
    grid = llm_int8[1].report.extra_grid("outlier_fraction")
    assert sorted(grid) == list(range(30)) and all(len(row) == 7 for row in grid.values())
    assert all(grid[r.block][r.name.split(".")[-1]] == r.extra["outlier_fraction"] for r in layers)
    assert llm_int8[1].report.extra_grid("no_such_key") == {}
    console = Console(record=True, width=200)
    llm_int8[1].print(console)
    text = console.export_text()
    assert "fraction of input dims with an outlier" in text
    row29 = [line for line in text.splitlines() if line.strip("│┃ ").startswith("29 ")]
    assert len(row29) == 1 and f"{100 * grid[29]['down_proj']:.1f}%" in row29[0]


def test_llm_int8_close_to_float_on_wikitext(smollm2, llm_int8, windows):
    """2 x 256 WikiText-2 test tokens: KL(float || llm-int8) measured 0.019 nats/token (at most 0.032 over
    calibration seeds, windows and library sets; benchmarks/results/test_margins.md). Perplexity (+1.1% here) and
    the comparison with naive W8A8's KL both move with the calibration and the text by as much as they measure
    (PPL ratio 1.006-1.043; KL llm-int8/naive 0.50-0.84 over seeds and windows): the per-layer comparison with
    naive W8A8 is test_llm_int8_report_on_smollm2's, the perplexity one quant_table's. SmolLM2-135M's
    activations are mostly below the threshold, so per-token int8 of the rest still costs ~2% perplexity here
    (threshold 1.5 would get within 0.3%)."""
    base = _logits(smollm2[0], windows)
    _, kl = _ppl_kl(_logits(llm_int8[0], windows), base, windows)
    assert kl < 0.07, kl


def test_llm_int8_save_load_identical_logits(tmp_path, smollm2, llm_int8, windows):
    model, res = llm_int8
    out = res.save(model, smollm2[1], tmp_path / "q", save_dtype=None)
    qcfg = json.loads((out / "quantization_config.json").read_text())
    assert qcfg["method"] == {"method": "llm-int8", "threshold": 6.0, "keep_outlier_weights": True,
                              "max_kept_fraction": 0.1}
    assert any(c["n_fp_cols"] > 0 for c in qcfg["modules"].values())
    loaded, _ = load(out)
    assert sum(isinstance(m, MixedInt8Linear) for m in loaded.modules()) == 210
    probe = windows[:1, :48]
    assert torch.equal(_logits(loaded, probe), _logits(model, probe))
