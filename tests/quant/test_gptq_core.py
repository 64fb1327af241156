"""lowbit.quant.gptq_core against a slow, direct float64 OBQ/GPTQ written from the paper's equations."""

import warnings

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.gptq_core import GPTQResult, HessianAccumulator, gptq_quantize
from lowbit.quant.observers import MSEObserver
from lowbit.kernels.primitives import QuantSpec, dequantize, fake_quantize, qparams, quantize, round_qparams


def _problem(n_out, n_in, seed, n_rows=None, dtype=torch.float64):
    """Random W [out, in] and a well-conditioned, correlated H = 2/N XᵀX [in, in]."""
    g = torch.Generator().manual_seed(seed)
    n_rows = n_rows or 4 * n_in
    mix = torch.eye(n_in, dtype=torch.float64) + 0.3 * torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    X = torch.randn(n_rows, n_in, generator=g, dtype=torch.float64) @ mix  # [N, in] correlated inputs
    X = X * (0.5 + torch.rand(n_in, generator=g, dtype=torch.float64))  # unequal channel variances
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return W.to(dtype), (2 / n_rows * X.T @ X).to(dtype), X


def _params(block, spec, mse_clip):
    """(scale, zero) [out, 1]: one range per row of block [out, k]."""
    if mse_clip:
        lo, hi = MSEObserver(QuantSpec(spec.bits, spec.symmetric, -1, spec.zero_point))(block)
        return qparams(lo[:, 0], hi[:, 0], spec)
    return qparams(block.amin(1, keepdim=True), block.amax(1, keepdim=True), spec)


def slow_gptq(W, H, spec, percdamp=0.01, act_order=False, mse_clip=False):
    """Direct OBQ in a fixed column order: no Cholesky, no blocks, explicit H⁻¹ elimination."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + percdamp * H.diag().mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    gs = spec.group_size
    if gs == -1:
        scale, zero = _params(W, spec, mse_clip)
    codes = torch.empty(W.shape, dtype=spec.code_dtype)
    loss = 0.0
    for q in range(n):
        if gs > 0 and q % gs == 0:
            scale, zero = _params(W[:, q:q + gs], spec, mse_clip)  # current (updated) weights
        c = quantize(W[:, q:q + 1], scale, zero, spec)
        qv = dequantize(c, scale, zero, spec)[:, 0]
        codes[:, q] = c[:, 0]
        d = Hinv[q, q]
        delta = -torch.outer((W[:, q] - qv) / d, Hinv[:, q])  # Eq. 2: δ = -(w_q - q)/[H⁻¹]_qq · H⁻¹_{:,q}
        W[:, q + 1:] += delta[:, q + 1:]
        loss += float(((W[:, q] - qv) ** 2 / d).sum()) / 2
        W[:, q] = qv
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / d  # Eq. 3: eliminate column q
    inv = torch.argsort(perm)
    return codes[:, inv], loss


CASES = [  # (out, in, blocksize, spec, act_order, mse_clip)
    (8, 24, 8, QuantSpec(4, True, -1), False, False),
    (6, 40, 16, QuantSpec(4, False, 8), False, False),  # blocksize not dividing in
    (5, 36, 7, QuantSpec(3, False, 12), True, False),  # groups start mid-block and cross blocks
    (4, 30, 64, QuantSpec(4, True, -1), True, False),  # one block
    (6, 45, 10, QuantSpec(2, True, 20), True, False),  # group not dividing in, 2 bits
    (5, 32, 12, QuantSpec(4, False, 16, "float"), False, False),
    (7, 33, 9, QuantSpec(8, False, -1), True, False),
    (4, 24, 10, QuantSpec(3, False, 8), True, True),  # MSE clipping per group
    (4, 20, 6, QuantSpec(4, True, -1), False, True),
]


@pytest.mark.parametrize("n_out,n_in,bs,spec,act_order,mse_clip", CASES)
def test_blocked_cholesky_equals_direct_obq(n_out, n_in, bs, spec, act_order, mse_clip):
    W, H, _ = _problem(n_out, n_in, seed=n_in)
    res = gptq_quantize(W, H, spec, blocksize=bs, act_order=act_order, mse_clip=mse_clip)
    codes, loss = slow_gptq(W, H, spec, act_order=act_order, mse_clip=mse_clip)
    assert res.codes.dtype == spec.code_dtype and res.codes.shape == W.shape
    assert torch.equal(res.codes, codes)
    assert res.loss == pytest.approx(loss, rel=1e-9)
    assert res.damp == pytest.approx(0.01 * float(H.diag().mean()), rel=1e-12)
    # The same codes with any block size (blocks are only a schedule).
    other = gptq_quantize(W, H, spec, blocksize=n_in + 5, act_order=act_order, mse_clip=mse_clip)
    assert torch.equal(other.codes, res.codes)


def _rtn(W, spec):
    """Round-to-nearest with the same grid; groups sliced by hand so a short last group works."""
    if spec.group_size <= 0:
        return fake_quantize(W, spec)
    per_row = QuantSpec(spec.bits, spec.symmetric, -1, spec.zero_point)
    return torch.cat([fake_quantize(W[:, k:k + spec.group_size], per_row)
                      for k in range(0, W.shape[1], spec.group_size)], dim=1)


def test_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    n_in, n_out, N = 64, 32, 512
    X = torch.randn(N, n_in, generator=g) @ (torch.eye(n_in) + 0.5 * torch.randn(n_in, n_in, generator=g))
    X[:, :4] *= 10  # a few large-variance channels
    W = torch.randn(n_out, n_in, generator=g)
    H = HessianAccumulator().update(X).H
    for spec, act_order in [(QuantSpec(4, False, 16), False), (QuantSpec(3, True, -1), True),
                            (QuantSpec(4, True, 24), True)]:
        res = gptq_quantize(W, H, spec, blocksize=16, act_order=act_order)
        err_gptq = ((W - res.W_hat) @ X.T).square().sum()
        err_rtn = ((W - _rtn(W, spec)) @ X.T).square().sum()
        assert err_gptq < 0.7 * err_rtn, (spec.tag, float(err_gptq), float(err_rtn))


def test_dead_columns():
    W, H, X = _problem(6, 24, seed=3)
    dead = torch.tensor([1, 7, 8, 20])
    X[:, dead] = 0
    H = 2 / X.shape[0] * X.T @ X
    for act_order in (False, True):
        res = gptq_quantize(W, H, QuantSpec(4, False, 8), blocksize=8, act_order=act_order)
        assert torch.isfinite(res.W_hat).all() and torch.isfinite(torch.tensor(res.loss))
        assert (res.W_hat[:, dead] == 0).all()  # asymmetric int grid: 0 is exact
        codes, loss = slow_gptq(W, H, QuantSpec(4, False, 8), act_order=act_order)
        assert torch.equal(res.codes, codes) and res.loss == pytest.approx(loss, rel=1e-9)
    # All inputs dead: everything is 0, no failure.
    res = gptq_quantize(W, torch.zeros(24, 24, dtype=torch.float64), QuantSpec(4, True, -1))
    assert (res.W_hat == 0).all()


def test_dampening_retry_warns_then_succeeds():
    v = torch.arange(1.0, 9.0)  # integer entries, v[0] = 1: Cholesky of v vᵀ hits an exactly-zero pivot
    H = torch.outer(v, v)  # [8, 8] rank 1, no dead columns
    W = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"percdamp=0\.01"):
        res = gptq_quantize(W, H, QuantSpec(4, True, -1), percdamp=0.0)
    assert res.percdamp == 0.01 and res.damp == pytest.approx(0.01 * float(H.diag().mean()))
    assert torch.isfinite(res.W_hat).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default dampening needs no retry
        gptq_quantize(W, H, QuantSpec(4, True, -1))


def test_dampening_gives_up_with_lowbit_error():
    with pytest.warns(UserWarning, match="retrying"), pytest.raises(LowbitError, match="Cholesky"):
        gptq_quantize(torch.randn(2, 4), -torch.eye(4), QuantSpec(4, True, -1))  # damping can't fix -I


def _check_roundtrip(res: GPTQResult, spec, W):
    assert res.g_idx.dtype == torch.int32 and res.g_idx.shape == (W.shape[1],)
    back = dequantize(res.codes, res.scale[:, res.g_idx], res.zero[:, res.g_idx], spec, dtype=W.dtype)
    assert torch.equal(back, res.W_hat)


def test_act_order_roundtrip_and_g_idx():
    W, H, _ = _problem(8, 48, seed=5, dtype=torch.float32)
    spec = QuantSpec(4, False, 16)
    res = gptq_quantize(W, H, spec, blocksize=16, act_order=True)
    _check_roundtrip(res, spec, W)
    assert res.scale.shape == res.zero.shape == (8, 3) and res.W_hat.dtype == torch.float32
    perm = torch.argsort(H.diag(), descending=True, stable=True)
    assert torch.equal(res.perm, perm)
    assert torch.equal(res.g_idx[perm].long(), torch.arange(48) // 16)  # groups in processing order
    assert not torch.equal(res.g_idx.long(), torch.arange(48) // 16)  # hence not contiguous
    assert torch.bincount(res.g_idx.long()).tolist() == [16, 16, 16]
    sym = QuantSpec(4, True, 16)
    res = gptq_quantize(W, H, sym, act_order=True)
    _check_roundtrip(res, sym, W)
    assert (res.zero == 0).all()


def test_group_size_not_dividing_in():
    W, H, _ = _problem(6, 96, seed=7)
    for act_order in (False, True):
        spec = QuantSpec(4, False, 40)
        res = gptq_quantize(W, H, spec, blocksize=32, act_order=act_order)
        assert res.scale.shape == (6, 3)
        assert torch.bincount(res.g_idx.long()).tolist() == [40, 40, 16]
        _check_roundtrip(res, spec, W)
        codes, _ = slow_gptq(W, H, spec, act_order=act_order)
        assert torch.equal(res.codes, codes)


def test_hessian_accumulator_matches_one_shot():
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 12), (7, 12), (1, 3, 12)]  # 10 + 7 + 3 rows
    batches = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    acc = HessianAccumulator(dtype=torch.float64)
    for b in batches:
        acc.update(b)
    X = torch.cat([b.reshape(-1, 12) for b in batches])  # [20, 12]
    assert acc.nsamples == 20
    torch.testing.assert_close(acc.H, 2 / 20 * X.T @ X, rtol=1e-12, atol=1e-12)
    acc32 = HessianAccumulator()
    for b in batches:
        acc32.update(b.float())
    assert acc32.H.dtype == torch.float32
    torch.testing.assert_close(acc32.H.double(), acc.H, rtol=1e-5, atol=1e-5)
    with pytest.raises(LowbitError, match="input features"):
        acc.update(torch.randn(3, 11, dtype=torch.float64))


def test_bad_arguments():
    W, H = torch.randn(2, 4), torch.eye(4)
    with pytest.raises(LowbitError, match="H must be"):
        gptq_quantize(W, torch.eye(5), QuantSpec())
    with pytest.raises(LowbitError, match="blocksize"):
        gptq_quantize(W, H, QuantSpec(), blocksize=0)
    with pytest.raises(LowbitError, match="finite"):
        gptq_quantize(W, H * float("nan"), QuantSpec())
    with pytest.raises(LowbitError, match="percdamp"):
        gptq_quantize(W, H, QuantSpec(), percdamp=-1)


def slow_static_gptq(W, H, spec, percdamp=0.01, act_order=False, mse_clip=False):
    """Static-groups GPTQ written straight from the algorithm, float64, one column at a time, no blocks:
    every group's range from the original W upfront; then in processing order each column is quantized
    on its ORIGINAL group's grid and its error is spread by OBQ (Eq. 2) with H⁻¹ eliminated (Eq. 3)."""
    W, H = W.double().clone(), H.double().clone()
    n, gs = W.shape[1], spec.group_size
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    params = [_params(W[:, k:k + gs], spec, mse_clip) for k in range(0, n, gs)]  # original order, no updates
    order = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(n)
    Hinv = torch.linalg.inv(H + percdamp * H.diag().mean() * torch.eye(n, dtype=torch.float64))
    codes = torch.empty(W.shape, dtype=spec.code_dtype)
    loss, todo = 0.0, torch.ones(n, dtype=torch.bool)  # todo: columns not quantized yet (original indices)
    for j in order.tolist():  # j: original column index
        scale, zero = params[j // gs]
        c = quantize(W[:, j:j + 1], scale, zero, spec)
        qv = dequantize(c, scale, zero, spec)[:, 0]
        codes[:, j] = c[:, 0]
        d = Hinv[j, j]
        err = (W[:, j] - qv) / d
        todo[j] = False
        W[:, todo] -= torch.outer(err, Hinv[j, todo])  # Eq. 2 on the columns still to come
        loss += float(((W[:, j] - qv) ** 2 / d).sum()) / 2
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d  # Eq. 3: eliminate column j
    return codes, loss


STATIC_CASES = [  # (out, in, blocksize, spec, act_order, mse_clip)
    (6, 40, 16, QuantSpec(4, False, 8), True, False),
    (5, 36, 7, QuantSpec(3, False, 12), True, False),  # groups and blocks cross each other
    (6, 45, 10, QuantSpec(2, True, 20), True, False),  # short last group, symmetric 2 bits
    (5, 32, 12, QuantSpec(4, False, 16, "float"), True, False),
    (4, 24, 10, QuantSpec(3, False, 8), True, True),  # MSE clipping per group
    (6, 40, 16, QuantSpec(4, False, 8), False, False),  # no act_order: only the ranges' timing differs
    (5, 45, 9, QuantSpec(4, True, 20), False, False),
]


@pytest.mark.parametrize("n_out,n_in,bs,spec,act_order,mse_clip", STATIC_CASES)
def test_static_groups_equals_direct_obq(n_out, n_in, bs, spec, act_order, mse_clip):
    W, H, _ = _problem(n_out, n_in, seed=n_in + 1)
    res = gptq_quantize(W, H, spec, blocksize=bs, act_order=act_order, mse_clip=mse_clip, static_groups=True)
    codes, loss = slow_static_gptq(W, H, spec, act_order=act_order, mse_clip=mse_clip)
    assert int((res.codes != codes).sum()) == 0  # measured: no mismatch in float64
    assert res.loss == pytest.approx(loss, rel=1e-9)
    # Contiguous original-order groups, ranges from the untouched W.
    assert torch.equal(res.g_idx.long(), torch.arange(n_in) // spec.group_size)
    for k in range(res.scale.shape[1]):
        s, z = _params(W[:, k * spec.group_size:(k + 1) * spec.group_size], spec, mse_clip)
        assert torch.equal(res.scale[:, k:k + 1], s) and torch.equal(res.zero[:, k:k + 1], z)
    _check_roundtrip(res, spec, W)
    other = gptq_quantize(W, H, spec, blocksize=n_in + 5, act_order=act_order, mse_clip=mse_clip,
                          static_groups=True)
    assert torch.equal(other.codes, res.codes)  # blocks are only a schedule


def test_static_groups_float32_scale_dtype_and_dead_columns():
    W, H, X = _problem(8, 48, seed=11, dtype=torch.float32)
    dead = torch.tensor([0, 9, 30])
    X[:, dead] = 0
    H = (2 / X.shape[0] * X.T @ X).float()
    spec = QuantSpec(4, False, 16)
    res = gptq_quantize(W, H, spec, blocksize=16, act_order=True, static_groups=True, scale_dtype=torch.float16)
    assert res.W_hat.dtype == torch.float32 and torch.isfinite(res.W_hat).all()
    assert torch.equal(res.g_idx.long(), torch.arange(48) // 16)
    assert torch.equal(res.perm, torch.argsort(H.diag(), descending=True, stable=True))
    _check_roundtrip(res, spec, W)
    assert (res.W_hat[:, dead] == 0).all()
    Wz = W.clone()
    Wz[:, dead] = 0  # ranges come from the dead-zeroed W, rounded to the stored dtype
    for k in range(3):
        s, z = qparams(Wz[:, 16 * k:16 * k + 16].amin(1, keepdim=True), Wz[:, 16 * k:16 * k + 16].amax(1, keepdim=True),
                       spec)
        s, z = round_qparams(s, z, torch.float16)
        assert torch.equal(res.scale[:, k:k + 1], s) and torch.equal(res.zero[:, k:k + 1], z)


def test_static_groups_no_effect_per_channel_and_per_tensor():
    W, H, _ = _problem(6, 30, seed=2)
    for spec in (QuantSpec(4, True, -1), QuantSpec(4, False, 0)):
        for act_order in (False, True):
            a = gptq_quantize(W, H, spec, blocksize=8, act_order=act_order)
            b = gptq_quantize(W, H, spec, blocksize=8, act_order=act_order, static_groups=True)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.g_idx, b.g_idx)


def test_static_groups_float32_agrees_with_float64_reference():
    W, H, _ = _problem(16, 128, seed=4)
    spec = QuantSpec(4, False, 32)
    codes, _ = slow_static_gptq(W, H, spec, act_order=True)
    res = gptq_quantize(W.float(), H.float(), spec, blocksize=48, act_order=True, static_groups=True)
    # Measured: 0 of 2048 codes differ; allow a few float32 rounding flips, each by one grid step.
    diff = (res.codes.long() - codes.long()).abs()
    assert int((diff != 0).sum()) <= 0.01 * codes.numel() and int(diff.max()) <= 1
