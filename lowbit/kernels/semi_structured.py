"""2:4 semi-structured sparse matmuls on NVIDIA sparse tensor cores (Ampere and newer), through PyTorch's
`to_sparse_semi_structured` (cuSPARSELt, or CUTLASS where cuSPARSELt is missing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_ok(w: torch.Tensor, x_dtype: torch.dtype) -> bool:
    """Whether w [out, in] (2:4 along the input) can run as a sparse-tensor-core weight for x_dtype inputs:
    a CUDA GPU of compute capability >= 8.0, fp16/bf16, and the widths the kernels tile (multiples of 64)."""
    return (w.is_cuda and x_dtype in _DTYPES and torch.cuda.get_device_capability(w.device)[0] >= 8
            and w.shape[0] % 64 == 0 and w.shape[1] % 64 == 0)


def to_semi_structured(w: torch.Tensor, dtype: torch.dtype):
    """Dense w [out, in] with at most 2 nonzeros in every 4 along the input -> the compressed sparse weight."""
    from torch.sparse import to_sparse_semi_structured
    return to_sparse_semi_structured(w.to(dtype).contiguous())


def semi_structured_linear(x: torch.Tensor, w_sparse, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w_sparse^T (+ bias) -> [..., out]."""
    x2 = x.reshape(-1, x.shape[-1])                                           # [M, in]
    y = F.linear(x2, w_sparse, bias)                                          # [M, out]
    return y.reshape(*x.shape[:-1], y.shape[-1])                              # [..., out]
