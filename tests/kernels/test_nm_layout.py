"""The compressed N:M layout: round trip, positions, refusal of weights that are not N:M."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.nm_layout import compress_nm, decompress_nm, is_nm
from lowbit.quant.sparsity import nm_mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_round_trip(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    W = torch.randn(6, 8 * m, generator=g)
    W = W * nm_mask(W.abs(), n, m)
    W[0, :m] = 0                                                          # an all-zero group
    values, index = compress_nm(W, n, m)
    assert values.shape == (6, 8 * n) and index.dtype == torch.uint8 and int(index.max()) < m
    assert torch.equal(decompress_nm(values, index, n, m), W) and is_nm(W, n, m)
    # positions: each value sits at its index within its group, ascending
    grp = W.reshape(6, 8, m)
    assert torch.equal(grp.gather(-1, index.long().reshape(6, 8, n)).reshape(6, -1), values)
    assert bool((index.reshape(6, 8, n).diff(dim=-1) > 0).all())


def test_refuses_dense_or_misaligned():
    with pytest.raises(LowbitError, match="more than 2"):
        compress_nm(torch.ones(2, 8), 2, 4)
    with pytest.raises(LowbitError, match="multiple"):
        compress_nm(torch.zeros(2, 6), 2, 4)
