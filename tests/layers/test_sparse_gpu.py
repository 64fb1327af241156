"""SparseLinear's 2:4 GPU path (sparse tensor cores through to_sparse_semi_structured) against the dense
matmul of the same weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.layers import SparseLinear
from lowbit.quant.sparsity import nm_mask


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_2of4_runs_on_sparse_tensor_cores_and_matches_dense(dtype):
    from torch.sparse import SparseSemiStructuredTensor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    w = w * nm_mask(w.abs(), 2, 4)
    layer = SparseLinear.from_weight(w, 2, 4, bias=torch.randn(256, generator=g), dtype=dtype).cuda()
    x = torch.randn(3, 100, 512, generator=g).to("cuda", dtype)
    y = layer(x)
    assert isinstance(layer._semi, SparseSemiStructuredTensor)
    ref = F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    assert y.shape == (3, 100, 256)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2   # bf16 output rounding: ~4e-3
