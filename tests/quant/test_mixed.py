"""Mixed precision to a bit budget: the allocator against brute force, the sensitivity against its
definition, and the whole path on the real SmolLM2 (its first 4 blocks)."""
import copy
import itertools

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec, fake_quantize_weight
from lowbit.layers import WeightOnlyLinear
from lowbit.models.loader import load
from lowbit.quant.api import quantize
from lowbit.quant.mixed import allocate, bits_per_weight, layer_sensitivity

BITS = (2, 3, 4, 8)


def _instance(k, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = {f"l{i}": int(torch.randint(1, 9, (1,), generator=g)) * 1000 for i in range(k)}
    errors, bpw = {}, {}
    for name in sizes:  # convex decreasing error curves in the stored bits
        a = float(torch.rand(1, generator=g)) * 10 + 0.1
        errors[name] = {b: a * 4.0 ** (-b) for b in BITS}
        bpw[name] = {b: b + 0.25 for b in BITS}
    return sizes, errors, bpw


def _cost(choice, sizes, errors, bpw):
    total = sum(sizes.values())
    return sum(errors[k][b] for k, b in choice.items()), sum(sizes[k] * bpw[k][b] for k, b in choice.items()) / total


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_the_budget_and_matches_brute_force(seed):
    sizes, errors, bpw = _instance(5, seed)
    combos = [_cost(dict(zip(sizes, c)), sizes, errors, bpw) for c in itertools.product(BITS, repeat=len(sizes))]
    for budget in (2.8, 3.3, 3.7, 4.6, 6.0):
        err, avg = _cost(allocate(sizes, errors, bpw, budget), sizes, errors, bpw)
        assert avg <= budget + 1e-9
        # the optimum under a budget 0.1% tighter (the rounding of costs to budget units gives up < 0.03%)
        assert err <= min(e for e, a in combos if a <= 0.999 * budget) + 1e-12
        assert err >= min(e for e, a in combos if a <= budget + 1e-9) - 1e-12


def test_allocation_refuses_an_impossible_budget():
    sizes, errors, bpw = _instance(3, 0)
    with pytest.raises(LowbitError, match="--bits-budget"):
        allocate(sizes, errors, bpw, 2.1)


def test_sensitivity_is_the_hessian_diagonal_weighted_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 64, dtype=torch.float64)
    H = 2 * X.t() @ X / 300
    W = torch.randn(16, 64, generator=g)
    spec = QuantSpec(bits=3, group_size=32)
    D = W.double() - fake_quantize_weight(W, spec).double()
    direct = float(torch.einsum("ij,j->", D.square(), H.diagonal()))     # diag part of tr(D H Dᵀ)
    assert layer_sensitivity(W, H.diagonal(), spec) == pytest.approx(direct, rel=1e-12)
    assert bits_per_weight(QuantSpec(bits=4, group_size=128), 576) == pytest.approx(4 + 32 * 5 / 576)


def test_budget_on_the_real_model_mixes_bits_and_reloads(tmp_path, smollm2_4, frozen_calib, frozen_test_ids):
    model = copy.deepcopy(smollm2_4[0])
    res = quantize(model, "rtn", frozen_calib(2, 64), progress=False, bits=4, group_size=128, bits_budget=3.5)
    layers = [m for m in model.model.layers.modules() if isinstance(m, WeightOnlyLinear)]
    bits = {lay.spec.bits for lay in layers}
    assert len(bits) > 1                                                  # really mixed
    stored = sum(lay.in_features * lay.out_features * bits_per_weight(lay.spec, lay.in_features) for lay in layers)
    assert stored / sum(lay.in_features * lay.out_features for lay in layers) <= 3.5 + 1e-9
    out = res.save(model, smollm2_4[1], tmp_path / "mixed", save_dtype=None)
    loaded, _ = load(out)
    ids = frozen_test_ids[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_budget_needs_calibration_and_a_valid_number(smollm2_4):
    with pytest.raises(LowbitError, match="calib"):
        quantize(copy.deepcopy(smollm2_4[0]), "rtn", None, progress=False, bits_budget=3.5)
    with pytest.raises(LowbitError, match="--bits-budget"):
        quantize(copy.deepcopy(smollm2_4[0]), "rtn", None, progress=False, bits_budget=1.0)
