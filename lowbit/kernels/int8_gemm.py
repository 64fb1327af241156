"""W8A8 int8 on the GPU (Triton): per-token activation quantization, then an int8 x int8 -> int32 GEMM
whose epilogue applies the scales (and bias) and writes the output dtype.

The references stay the oracles (lowbit.kernels.int8_matmul.quantize_act_int8, int8_mm, Int8Linear.forward)
and the kernels reproduce them bit for bit, which is why some arithmetic looks roundabout:
  scales  absmax * fp32(1/127) on CUDA, absmax / 127 elsewhere: what torch itself computes for the
          reference's `tensor / 127` on each device (see quant_rows).
  codes   x / scale as an IEEE fp32 division (div_rn: Triton's plain '/' on fp32 is an approximate
          division on NVIDIA), round-half-to-even like torch.round, clamp to the reference grid [-128, 127]
          (dynamic codes never pass 127: absmax / (absmax / 127) rounds to 127 at most).
  sums    int32 tensor-core accumulation, exact while K < INT32_SAFE_K (the layer falls back beyond).
  output  (acc * x_scale) * w_scale + bias in fp32, in the reference's order, compiled without fp
          contraction (an FMA rounds once where the reference rounds twice), then one cast.
So on the same CUDA tensors, Int8Linear gives the same bytes with and without the kernels.

Weights stay in nn.Linear layout, qweight int8 [N, K] row-major: that is K-major, the only layout
Hopper's 8-bit wgmma takes for B, so no repacking is needed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.int8_matmul import INT32_SAFE_K, int8_mm

FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)
# _quant_rows_kernel modes
ROW, STATIC, FROM_ROWMAX, ROWMAX_ONLY = 0, 1, 2, 3


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _round_half_even(v):
    """torch.round of fp32 v (|v| < 2^23) using only exact operations (tl has no portable rint)."""
    a = tl.abs(v)
    f = tl.floor(a)
    d = a - f  # exact: d = a below 1, and f <= a < 2f above it (Sterbenz)
    odd = (f.to(tl.int32) & 1) == 1
    r = f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)
    return tl.where(v < 0, -r, r)


@triton.jit
def _round_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest float8 e4m3fn value, ties to even, as an exact fp32.

    Rounding here instead of in the fp8 cast makes the cast exact, so the codes do not depend on how a
    backend (or the interpreter) rounds conversions; the sign of zero is kept like the reference's.
    """
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent; -127 for zero
    step_e = tl.maximum(e, -6) - 3  # 3 mantissa bits; below 2^-6 (subnormals) the step stays 2^-9
    step = ((step_e + 127) << 23).to(tl.float32, bitcast=True)  # 2^step_e
    inv = ((127 - step_e) << 23).to(tl.float32, bitcast=True)  # 2^-step_e: scaling by it is exact
    r = _round_half_even(a * inv) * step
    # Sign bit test (catches -0.0) and a multiply (Triton's unary minus is 0 - r, which loses -0.0).
    return tl.where(v.to(tl.int32, bitcast=True) < 0, r * -1.0, r)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, src_ptr, M, K, stride_xm, stride_qm,
                       MODE: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, RECIP: tl.constexpr,
                       INV_QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row of x [M, K]: q = codes, s[row] = the row's scale.

    MODE 0: scale = row absmax / QMAX (per token); 1: scale = src[0] (static); 2: scale = max(src[:M]) / QMAX
    (per tensor, src holding every row's absmax); 3: only write the row absmax to s[row].
    A zero absmax gives scale 1, as in the references. RECIP: absmax * INV_QMAX (fp32 1/QMAX) instead of a
    division, which is what torch computes for `cuda_tensor / python_number` (see quant_rows).
    """
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    if MODE == 1:
        scale = tl.load(src_ptr)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        if MODE == 2:
            for m0 in range(0, M, BLOCK_K):
                amax = tl.maximum(amax, tl.load(src_ptr + m0 + offs, mask=m0 + offs < M, other=0.0))
        else:
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(xk))
        scale = tl.max(amax, axis=0)  # the absmax, which mode 3 stores as is
        if MODE != 3:
            if RECIP:
                scale = scale * INV_QMAX
            else:
                scale = tl.math.div_rn(scale, QMAX)
            scale = tl.where(scale > 0, scale, 1.0)
    if MODE != 3:
        q_row = q_ptr + row.to(tl.int64) * stride_qm
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(xk, scale)
            if FP8:
                q = _round_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX))
            else:  # clamping to integer bounds before rounding equals clamping after
                q = _round_half_even(tl.minimum(tl.maximum(v, -128.0), 127.0))
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _epilogue(acc, rm, rn, M, N, xs_ptr, ws_ptr, bias_ptr,
              HAS_XS: tl.constexpr, HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 acc [BM, BN] -> (acc * xs[m]) * ws[n] + bias[n], each step rounded as in the reference."""
    y = acc
    if HAS_XS:
        y = y * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_WS:
        y = y * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                      stride_am, stride_bn, stride_cm,
                      EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c [M, N] = a [M, K] int8 @ b [N, K].T int8 (int32 sums), rescaled in the epilogue when EPILOGUE."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the same weight column tiles while those are still in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge re-read valid ones (modulo) so the loads need no M/N masks; never stored.
    a_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :]  # [BM, BK]
    b_ptrs = b_ptr + (rn % N).to(tl.int64)[None, :] * stride_bn + rk[:, None]  # [BK, BN], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # zeros past K add nothing to the sums
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if EPILOGUE:
        y = _epilogue(acc.to(tl.float32), rm, rn, M, N, xs_ptr, ws_ptr, bias_ptr, True, True, HAS_BIAS)
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _rescale_kernel(acc_ptr, y_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, stride_am, stride_ym,
                    HAS_XS: tl.constexpr, HAS_WS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y [M, N] = _epilogue(acc [M, N]) for a product computed elsewhere (torch._int_mm, _scaled_mm)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    acc = tl.load(acc_ptr + rm.to(tl.int64)[:, None] * stride_am + rn[None, :], mask=mask, other=0).to(tl.float32)
    y = _epilogue(acc, rm, rn, M, N, xs_ptr, ws_ptr, bias_ptr, HAS_XS, HAS_WS, HAS_BIAS)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def supported(x: torch.Tensor, in_features: int) -> bool:
    """Whether the kernels reproduce the reference for this input (else the layer keeps its own path)."""
    return x.dtype in FLOAT_OUT and in_features < INT32_SAFE_K and x.numel() > 0


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    if device_index is None:  # CPU tensors under TRITON_INTERPRET=1: pretend an H100
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _inv_f32(q: float) -> float:
    """1 / q divided in float32 (as torch does on the host for its CUDA kernels), exact as a Python float."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(q, dtype=torch.float32))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[M, K] view with unit stride along K (kernels index rows by stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def quant_rows(x: torch.Tensor, mode: int, src: torch.Tensor | None = None, fp8: bool = False,
               qmax: float = 127.0, recip: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scale float32 [M, 1]); see _quant_rows_kernel.
    ROWMAX_ONLY gives (None, row absmax [M, 1]).

    recip (default: x.is_cuda) computes the dynamic scale as absmax * fp32(1 / qmax): the references divide
    by a Python number, which torch's CUDA kernel turns into that multiply (its CPU kernel divides), so
    this matches the reference on x's own device bit for bit.
    """
    x = _rows(x)
    m, k = x.shape
    s = torch.empty(m, device=x.device, dtype=torch.float32)
    q = None if mode == ROWMAX_ONLY else torch.empty(m, k, device=x.device,
                                                     dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    if m == 0 or k == 0:
        return q, s.unsqueeze(1)
    block = min(triton.next_power_of_2(k), 2048)
    _quant_rows_kernel[(m,)](x, s if q is None else q, s, s if src is None else src, m, k, x.stride(0),
                             k if q is None else q.stride(0), MODE=mode, FP8=fp8, QMAX=qmax,
                             RECIP=x.is_cuda if recip is None else recip, INV_QMAX=_inv_f32(qmax), BLOCK_K=block,
                             num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False)
    return q, s.unsqueeze(1)  # s [M] -> [M, 1]


def quant_int8(x: torch.Tensor, act_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act_int8 on the GPU: x [M, K] -> (int8 codes [M, K], scale [M, 1]); a static act_scale
    gives the same codes and that scale repeated on every row (the reference returns it once, [1, 1])."""
    if act_scale is None:
        return quant_rows(x, ROW)
    return quant_rows(x, STATIC, act_scale.reshape(1).float())


def gemm_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Tile sizes by shape (H100). M <= 64 streams the weight once, so tiles are thin along N to spread
    it over every SM; larger M is compute-bound, so tiles are big for reuse, shrunk if the grid is short."""
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        tiles_m = triton.cdiv(m, bm)
        bn = next((b for b in (128, 64, 32) if tiles_m * triton.cdiv(n, b) >= sms), 16)
        bk = 256 if bm <= 32 else 128
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
    if triton.cdiv(m, 128) * triton.cdiv(n, 128) >= sms:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)


def int8_gemm(qx: torch.Tensor, qweight: torch.Tensor, x_scale: torch.Tensor | None = None,
              w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, config: dict | None = None) -> torch.Tensor:
    """qx [M, K] int8 @ qweight [N, K].T int8. Without scales: the exact int32 sums [M, N]. With x_scale
    [M, 1] and w_scale [N, 1] (float32): (sums * x_scale) * w_scale (+ bias [N]) in out_dtype [M, N]."""
    if qx.dtype != torch.int8 or qweight.dtype != torch.int8 or qx.shape[1] != qweight.shape[1]:
        raise LowbitError(f"int8_gemm needs int8 [M, K] and [N, K], got {qx.dtype} {tuple(qx.shape)} and "
                          f"{qweight.dtype} {tuple(qweight.shape)}")
    scaled = x_scale is not None
    if scaled != (w_scale is not None):
        raise LowbitError("int8_gemm needs both x_scale and w_scale, or neither (int32 sums)")
    qx, qweight = _rows(qx), _rows(qweight)
    m, k = qx.shape
    n = qweight.shape[0]
    c = torch.empty(m, n, device=qx.device, dtype=out_dtype if scaled else torch.int32)
    if m == 0:
        return c
    cfg = dict(config or gemm_config(m, n, k, _sm_count(qx.device.index if qx.is_cuda else None)))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    xs = x_scale.reshape(-1).float() if scaled else c  # [M]; c is a dummy pointer when unused
    ws = w_scale.reshape(-1).float() if scaled else c  # [N]
    _int8_gemm_kernel[grid](qx, qweight, c, xs, ws, c if bias is None else bias, m, n, k,
                            qx.stride(0), qweight.stride(0), c.stride(0),
                            EPILOGUE=scaled, HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
                            enable_fp_fusion=False, **cfg)
    return c


def rescale(acc: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor | None,
            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] (int32 or float32) -> (acc * x_scale [M, 1]) * w_scale [N, 1] + bias [N] in out_dtype,
    one fused pass; any of the three may be None."""
    acc = _rows(acc)
    m, n = acc.shape
    y = torch.empty(m, n, device=acc.device, dtype=out_dtype)
    if m == 0:
        return y
    xs = None if x_scale is None else x_scale.reshape(-1).float()  # [M]
    ws = None if w_scale is None else w_scale.reshape(-1).float()  # [N]
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
    _rescale_kernel[grid](acc, y, y if xs is None else xs, y if ws is None else ws, y if bias is None else bias,
                          m, n, acc.stride(0), y.stride(0), HAS_XS=xs is not None, HAS_WS=ws is not None,
                          HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=128, num_warps=4,
                          enable_fp_fusion=False)
    return y


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                act_scale: torch.Tensor | None = None, backend: str = "triton") -> torch.Tensor:
    """W8A8 int8 linear: x [..., K] -> y [..., N] in x's dtype (same values as Int8Linear's reference).

    qweight int8 [N, K], w_scale float32 [N, 1], act_scale: static activation scale (one value) or None
    for per-token dynamic. backend: "triton" (fused GEMM + epilogue) or "int_mm" (torch._int_mm, then
    one rescale pass; for comparing prefill speed).
    """
    if x.dtype not in FLOAT_OUT:
        raise LowbitError(f"int8_linear needs a float16/bfloat16/float32 input, got {x.dtype}")
    if backend not in ("triton", "int_mm"):
        raise LowbitError(f"backend must be 'triton' or 'int_mm', got {backend!r}")
    n, k = qweight.shape
    x2 = x.reshape(-1, k)  # [M, K]
    qx, sx = quant_int8(x2, act_scale)  # [M, K] int8, [M, 1]
    if backend == "int_mm":
        y = rescale(int8_mm(qx, qweight), sx, w_scale, bias, x.dtype)  # [M, N]
    else:
        y = int8_gemm(qx, qweight, sx, w_scale, bias, x.dtype)  # [M, N]
    return y.reshape(*x.shape[:-1], n)  # [..., N]
