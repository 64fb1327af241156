"""Pruning methods on the layer walk, on the real SmolLM2 (its first 4 blocks): patterns hold, layers
store the compressed layout, checkpoints reload to the same outputs."""
import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.nm_layout import is_nm
from lowbit.layers import SparseLinear, WeightOnlyLinear
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.quant.registry import get_method


@pytest.fixture(scope="module")
def calib(frozen_calib):
    return frozen_calib(2, 64)


def _linears(model, cls):
    found = [m for n, m in model.model.layers.named_modules() if isinstance(m, cls)]
    assert len(found) == 4 * 7
    return found


def test_magnitude_2_4_reloads_identically(tmp_path, smollm2_4, frozen_test_ids):
    model = copy.deepcopy(smollm2_4[0])
    res = quantize(model, "magnitude", progress=False, sparsity="2:4")
    for lay in _linears(model, SparseLinear):
        w = lay.dequantized_weight()
        assert (lay.n, lay.m) == (2, 4) and is_nm(w, 2, 4) and float((w != 0).float().mean()) > 0.49
        assert lay.values.shape[1] == lay.in_features // 2                # the compressed layout is stored
    out = res.save(model, smollm2_4[1], tmp_path / "mag", save_dtype=None)
    loaded, _ = load(out)
    ids = frozen_test_ids[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_wanda_unstructured_prunes_half_of_every_row(smollm2_4, calib):
    model = copy.deepcopy(smollm2_4[0])
    quantize(model, "wanda", calib, progress=False, sparsity="0.5")
    for lay in _linears(model, SparseLinear):
        w = lay.dequantized_weight()
        assert lay.m == 0 and bool(((w == 0).sum(1) >= lay.in_features // 2).all())


def test_sparsegpt_2_4_with_4_bits(tmp_path, smollm2_4, calib, frozen_test_ids):
    model = copy.deepcopy(smollm2_4[0])
    res = quantize(model, "sparsegpt", calib, progress=False, sparsity="2:4", bits=4, group_size=64)
    for lay in _linears(model, WeightOnlyLinear):
        assert is_nm(lay.dequantized_weight(), 2, 4)
    assert all(0.49 < r.extra["density"] <= 0.5 for r in res.report.layers)
    out = res.save(model, smollm2_4[1], tmp_path / "sgpt", save_dtype=None)
    loaded, _ = load(out)
    ids = frozen_test_ids[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_bad_options_are_one_line_errors():
    with pytest.raises(LowbitError, match="--sparsity"):
        get_method("magnitude", sparsity="3:2")
    with pytest.raises(LowbitError, match="--bits"):
        get_method("sparsegpt", bits=9)
    with pytest.raises(LowbitError, match="does not apply"):
        get_method("wanda", bits=4)
