"""FP8 W8A8 (e4m3) on the GPU: Triton activation quantization, then torch._scaled_mm (cuBLASLt/CUTLASS).

Activation scale granularity: per TENSOR (dynamic; lowbit's FP8 method), per TOKEN (dynamic; the
compressed-tensors FP8_DYNAMIC scheme that hub checkpoints use, per_token=True) or the static act_scale,
exactly as FP8Linear's CPU reference, so the GPU output equals the reference up to accumulation order and
the final rounding.

The product, for x bfloat16 where torch supports row-wise scales (sm_90, torch 2.11):
  _scaled_mm(qx, qw.T, scale_a [M, 1] = the tensor scale on every row, scale_b [1, N] = w_scale,
             bias, out bfloat16)                     one kernel, scales and bias in its fp32 epilogue
otherwise (fp16/fp32 inputs, a non-bf16 bias, no row-wise support):
  _scaled_mm(tensor-wise scale_a, scale_b = 1 or the per-tensor w_scale, out float32), then one fused
  rescale pass (* w_scale per row of W, + bias, cast): the reference's own sequence, so bitwise equal to it;
and where _scaled_mm cannot run at all (K or N not a multiple of 16, sm < 8.9, CPU): the reference's
fp32 emulation on the kernel's codes.
"""
from __future__ import annotations

import functools

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.int8_gemm import FLOAT_OUT, FROM_ROWMAX, ROW, ROWMAX_ONLY, STATIC, quant_rows, rescale
from lowbit.kernels.int8_matmul import scaled_mm_supported
from lowbit.kernels.primitives import fp8_dequantize

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def supported(x: torch.Tensor) -> bool:
    """Whether fp8_linear reproduces the reference for this input (else the layer keeps its own path)."""
    return x.dtype in FLOAT_OUT and x.numel() > 0


def quant_fp8(x: torch.Tensor, act_scale: torch.Tensor | None = None,
              per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act_fp8 on the GPU: x [M, K] -> (e4m3 codes [M, K], scale float32 [M, 1]), the one
    per-tensor (or static) scale repeated on every row (the reference returns it once, [1, 1]); per_token:
    each row's own scale."""
    if act_scale is not None:
        return quant_rows(x, STATIC, act_scale.reshape(1).float(), fp8=True, qmax=E4M3_MAX)
    if x.shape[0] == 1 or per_token:  # each row's own absmax (one row: the tensor's): one launch
        return quant_rows(x, ROW, fp8=True, qmax=E4M3_MAX)
    _, rowmax = quant_rows(x, ROWMAX_ONLY, fp8=True, qmax=E4M3_MAX)  # [M, 1]
    return quant_rows(x, FROM_ROWMAX, rowmax.reshape(-1), fp8=True, qmax=E4M3_MAX)


@functools.lru_cache(maxsize=None)
def rowwise_supported(device_index: int) -> bool:
    """Whether this torch build takes row-wise fp32 scales in _scaled_mm on this GPU (probed once)."""
    dev = torch.device("cuda", device_index)
    a = torch.zeros(16, 32, device=dev, dtype=torch.float8_e4m3fn)
    b = torch.zeros(32, 32, device=dev, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 32, device=dev),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)  # cached: no fill kernel per call


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               act_scale: torch.Tensor | None = None, rowwise: bool | None = None,
               per_token: bool = False) -> torch.Tensor:
    """FP8 W8A8 linear: x [..., K] -> y [..., N] in x's dtype (FP8Linear's reference semantics).

    qweight float8_e4m3fn [N, K], w_scale float32 [N, 1] (per channel) or [1, 1]; act_scale: static
    activation scale or None (per-tensor dynamic; per_token: per-row dynamic). rowwise: force (True/False)
    the row-wise _scaled_mm path; None picks it where it applies (see the module docstring).
    """
    if x.dtype not in FLOAT_OUT:
        raise LowbitError(f"fp8_linear needs a float16/bfloat16/float32 input, got {x.dtype}")
    n, k = qweight.shape
    x2 = x.reshape(-1, k)  # [M, K]
    qx, sx = quant_fp8(x2, act_scale, per_token)  # [M, K] e4m3, [M, 1]
    if not scaled_mm_supported(qx, qweight):  # the reference's emulation, on the kernel's codes
        y = fp8_dequantize(qx, sx) @ fp8_dequantize(qweight, w_scale).t()  # [M, N] float32
        y = (y if bias is None else y + bias.float()).to(x.dtype)
        return y.reshape(*x.shape[:-1], n)  # [..., N]
    if rowwise is None:
        rowwise = x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16) \
            and rowwise_supported(qx.device.index)
    y = None
    if rowwise:
        sb = w_scale.reshape(1, -1).float().expand(1, n).contiguous()  # [N, 1] or [1, 1] -> [1, N]
        try:  # shape checks run on the host before any launch, so a refusal leaves nothing behind
            y = torch._scaled_mm(qx, qweight.t(), scale_a=sx, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
            y = y.to(x.dtype)  # [M, N]; a no-op for the bf16 inputs picked by default
        except RuntimeError:
            y = None
    if y is None:
        per_row = w_scale.numel() > 1
        acc = torch._scaled_mm(qx, qweight.t(), scale_a=_one(qx.device) if per_token else sx[:1].reshape(()),
                               scale_b=_one(qx.device) if per_row else w_scale.reshape(()).float(),
                               out_dtype=torch.float32)  # [M, N] = (qx . qw) * sx (* w_scale per tensor)
        y = rescale(acc, sx if per_token else None, w_scale if per_row else None, bias, x.dtype)  # [M, N]
    return y.reshape(*x.shape[:-1], n)  # [..., N]
