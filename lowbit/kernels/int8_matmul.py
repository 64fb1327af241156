"""W8A8 compute: activation quantizers, exact int8 x int8 -> int32 products, the fp8 scaled product.

int8_mm is exact on every path: products are at most 128*128 = 2^14, so an int32
accumulator cannot overflow while K < 2^17 (past that we accumulate in int64).
  CUDA  torch._int_mm (cuBLASLt int8 tensor cores). It rejects M <= 16, K or N not
        multiples of 8, and some other small shapes, so every dimension is zero-padded to a
        multiple of 32 first (zero rows/columns add nothing to the sums, so the result is
        still exact) and sliced back.
  CPU   float32 BLAS over slices of K <= 1024: every partial sum is an integer of magnitude
        <= 2^14 * 1024 = 2^24, which float32 holds exactly whatever the summation order, so
        each slice is exact; slices are added in int32. 5x faster than torch's integer mm
        (no BLAS for integers), which stays as the reference in tests/quant/test_layers.py.
  other float64 matmul: every partial sum is an integer below 2^53, so it is exact too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.primitives import QuantSpec, dequantize, fp8_dequantize, fp8_quantize, quantize, quantize_per_token

INT32_SAFE_K = (1 << 31) // (1 << 14)  # K below this cannot overflow an int32 accumulator
FP32_EXACT_K = (1 << 24) // (1 << 14)  # K slice whose float32 sums of int8 products are exact
INT8_SYM = QuantSpec(bits=8, symmetric=True, group_size=-1)  # int8 weights per channel / activations per token
FP8_FMT = "e4m3"


def quantize_act_int8(x: torch.Tensor, act_scale: torch.Tensor | None):
    """x [M, in] -> (int8 codes [M, in], scale [M, 1] per-token dynamic, or [1, 1] static act_scale)."""
    if act_scale is None:
        return quantize_per_token(x)
    s = act_scale.reshape(1, 1).float()
    return quantize(x, s, 0, INT8_SYM), s


def quantize_act_fp8(x: torch.Tensor, act_scale: torch.Tensor | None, per_token: bool = False):
    """x [M, in] -> (e4m3 codes [M, in], scale [1, 1]): per-tensor dynamic, or the static act_scale;
    per_token: one dynamic scale per row, [M, 1]."""
    if per_token and act_scale is None:
        return fp8_quantize(x, FP8_FMT, per_channel=True)
    return fp8_quantize(x, FP8_FMT, per_channel=False, scale=None if act_scale is None else act_scale.reshape(1, 1))


# name -> (quantize(x [M, in], act_scale) -> (q, scale), dequantize(q, scale) -> float32 [M, in])
ACT_QUANT = {
    "int8": (quantize_act_int8, lambda q, s: dequantize(q, s, 0, INT8_SYM)),
    "fp8": (quantize_act_fp8, fp8_dequantize),
}


def _check_int8(a: torch.Tensor, b: torch.Tensor):
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise LowbitError(f"int8_mm needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise LowbitError(f"int8_mm needs a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")


def _pad_to(n: int, mult: int, least: int = 0) -> int:
    return max(least, -(-n // mult) * mult) - n


def int8_mm(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32 [M, N], exact (b in nn.Linear weight layout).

    (int64 for K >= 2^17, where int32 sums could overflow.)
    backend: "auto" (CUDA -> _int_mm, CPU -> exact float32 slices), "int_mm", "float" or "fallback"
    (integer mm; tests compare the paths on one device).
    """
    _check_int8(a, b)
    if backend not in ("auto", "int_mm", "float", "fallback"):
        raise LowbitError(f"backend must be 'auto', 'int_mm', 'float' or 'fallback', got {backend!r}")
    m, k = a.shape
    n = b.shape[0]
    use_int_mm = backend == "int_mm" or (backend == "auto" and a.is_cuda)
    if use_int_mm and k < INT32_SAFE_K:
        # cuBLASLt int8 also rejects some legal-looking shapes (e.g. K = 16 with M = 258): pad every
        # dimension to a multiple of 32 (M at least 32); zero rows/columns keep the sums exact.
        pm, pk, pn = _pad_to(m, 32, least=32), _pad_to(k, 32), _pad_to(n, 32)
        if pm or pk or pn:
            a = F.pad(a, (0, pk, 0, pm))  # [M', K']
            b = F.pad(b, (0, pk, 0, pn))  # [N', K']
        # b.t() is a column-major [K', N'] view: the layout cuBLASLt wants for mat2.
        return torch._int_mm(a, b.t())[:m, :n]
    acc = torch.int32 if k < INT32_SAFE_K else torch.int64  # int64 only where int32 could overflow
    if backend == "float" or (backend == "auto" and a.device.type == "cpu"):
        return _float_sliced_mm(a, b, acc)
    if a.device.type != "cpu":  # no integer mm there; float64 holds integer sums < 2^53 exactly
        return torch.matmul(a.double(), b.double().t()).to(acc)  # [M, N]
    return torch.matmul(a.to(acc), b.to(acc).t())  # [M, N]


def _float_sliced_mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Exact a [M, K] @ b [N, K].T through float32 matmuls over K slices of FP32_EXACT_K."""
    out = None
    for k0 in range(0, a.shape[1], FP32_EXACT_K):
        part = (a[:, k0:k0 + FP32_EXACT_K].float() @ b[:, k0:k0 + FP32_EXACT_K].float().t()).to(acc)  # [M, N]
        out = part if out is None else out.add_(part)
    return out


def scaled_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._scaled_mm can take fp8 a [M, K] x b [N, K].T here (CUDA sm >= 8.9, K, N % 16)."""
    if not (a.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    if torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    return a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0


def fp8_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """fp8 qa [M, K] (scale sa, one value) @ qb [N, K].T (scale sb [N, 1] or one value) -> float32 [M, N].

    Tensor-wise scales go into _scaled_mm's epilogue; a per-row weight scale is applied
    after it, in fp32, because row-wise scaling support differs across torch versions.
    """
    one = torch.ones((), dtype=torch.float32, device=qa.device)
    per_row = sb.numel() > 1
    out = torch._scaled_mm(qa.contiguous(), qb.t(), scale_a=sa.reshape(()).float(),
                           scale_b=one if per_row else sb.reshape(()).float(), out_dtype=torch.float32)
    return out * sb.reshape(1, -1).float() if per_row else out  # [M, N]
