"""W8A8 int8 / fp8 GPU paths (lowbit.kernels.int8_gemm, fp8_gemm) against the layers' reference paths.

Three tiers: CPU (CI without Triton: the dispatch falls back), Triton's interpreter (the kernels on CPU
tensors; run in a subprocess so TRITON_INTERPRET=1 stays out of this process) and @gpu (random shapes
on the real kernels, against the reference on the same CUDA tensors).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from helpers import triton_interpreter_ok
except ImportError:  # this file run as a script inside the interpreter subprocess
    def triton_interpreter_ok() -> bool:
        return True
import torch
import torch.nn as nn

from lowbit.kernels import kernels_disabled
from lowbit.kernels.int8_matmul import int8_mm, quantize_act_fp8, quantize_act_int8
from lowbit.layers import FP8Linear, Int8Linear

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = Path(__file__).resolve().parents[2]
ODD = [(1, 72, 24), (3, 200, 100), (17, 72, 100), (3, 256, 24)]  # (M, K, N); K=256 takes the EVEN_K loop


def _linear(k, n, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02 * torch.linspace(0.5, 3, n)[:, None])
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin.to(device)


def _layers(k, n, dtype, bias=True, static=False, device="cpu"):
    """(Int8Linear, FP8Linear) of one random Linear; static: calibrated activation scales for absmax 4."""
    lin = _linear(k, n, bias, device=device)
    i8 = Int8Linear.from_linear(lin, act_scale=torch.tensor([4 / 127]) if static else None, dtype=dtype)
    f8 = FP8Linear.from_linear(lin, act_scale=torch.tensor([4 / 448]) if static else None, dtype=dtype)
    return i8.to(device), f8.to(device)


def _ulps_bf16(y, ref):
    """Largest |y - ref| in units of ref's bf16 spacing (the interpreter's f32 -> bf16 cast is not RNE)."""
    spacing = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp(min=1e-30)
    return float(((y.float() - ref.float()).abs() / spacing).max())


# ----------------------------------------------------------------------------- CPU (CI)

@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_falls_back(static, dtype):
    for layer in _layers(200, 24, dtype, static=static):
        x = torch.randn(2, 3, 200).to(dtype)
        with kernels_disabled():
            ref = layer(x)
        with kernels_disabled(False):  # kernels allowed: a CPU tensor still takes the reference path
            assert torch.equal(layer(x), ref)
        assert torch.equal(layer(x), ref)


# ----------------------------------------------------------------------------- interpreter checks

def _interp_quant():
    from lowbit.kernels.fp8_gemm import quant_fp8
    from lowbit.kernels.int8_gemm import ROW, quant_int8, quant_rows

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for m, k, _ in ODD:
            x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)).to(dt)
            x[m // 2] = 0  # zero row: scale 1, codes 0
            for static in (None, torch.tensor([0.01])):
                q, s = quant_int8(x, static)
                qr, sr = quantize_act_int8(x, static)
                assert torch.equal(q, qr) and torch.equal(s, sr.expand(m, 1)), (dt, m, k, static)
                q, s = quant_fp8(x, static)  # M == 1: one launch; M > 1: row absmax, then quantize
                qr, sr = quantize_act_fp8(x, static)
                assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), (dt, m, k, static)
                assert torch.equal(s, sr.expand(m, 1))
    # recip=True: the scale as torch computes the reference's `absmax / 127` on CUDA (absmax * fp32(1/127)).
    x = torch.randn(64, 200, generator=g) * torch.rand(64, 1, generator=g) * 10  # [64, 200]
    for fp8, qmax in ((False, 127.0), (True, 448.0)):
        q, s = quant_rows(x, ROW, fp8=fp8, qmax=qmax, recip=True)
        s_ref = x.abs().amax(1, keepdim=True) * (torch.tensor(1.0) / torch.tensor(qmax))  # [64, 1]
        assert torch.equal(s, s_ref)
        v = x / s_ref
        q_ref = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn) if fp8 else v.round().clamp(-128, 127).to(torch.int8)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert not torch.equal(s_ref, x.abs().amax(1, keepdim=True) / qmax)  # the two really differ here
    # Ties and near-ties at a static scale of 1: round-half-to-even, clamping, the sign of zero.
    h = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    x = torch.cat([h, h.nextafter(h + 1), h.nextafter(h - 1), torch.tensor([-0.0, 0.49999997, 1e30, -1e30])])
    q, _ = quant_int8(x[None], torch.tensor([1.0]))
    assert torch.equal(q, quantize_act_int8(x[None], torch.tensor([1.0]))[0])
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[~e4m3.isnan()].unique()  # every finite e4m3 value, their midpoints and neighbours
    mid = (e4m3[1:] + e4m3[:-1]) / 2
    x = torch.cat([e4m3, mid, mid.nextafter(mid + 1), mid.nextafter(mid - 1), torch.tensor([-0.0, -1e-30, 500.])])
    q, _ = quant_fp8(x[None], torch.tensor([1.0]))
    assert torch.equal(q.view(torch.uint8), quantize_act_fp8(x[None], torch.tensor([1.0]))[0].view(torch.uint8))


def _interp_gemm():
    from lowbit.kernels.int8_gemm import gemm_config, int8_gemm

    g = torch.Generator().manual_seed(1)
    shapes = [(m, k, n) for m in (1, 3, 17) for k in (72, 200) for n in (24, 100)] + [(130, 200, 100), (3, 256, 24)]
    for m, k, n in shapes:
        qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        assert torch.equal(int8_gemm(qx, qw), int8_mm(qx, qw, backend="fallback")), (m, k, n)
    assert gemm_config(130, 100, 200)["GROUP_M"] == 8  # (130, ...) above took the grouped prefill tiles
    # Extremes: every product (-128)^2 = 2^14, K = 8192: sums of 2^27, exact.
    a, b = torch.full((2, 8192), -128, dtype=torch.int8), torch.full((16, 8192), -128, dtype=torch.int8)
    assert bool((int8_gemm(a, b) == 8192 * 16384).all())


def _interp_epilogue():
    from lowbit.kernels.int8_gemm import int8_gemm, rescale

    g = torch.Generator().manual_seed(2)
    for m, k, n in ODD:
        qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        xs, ws = torch.rand(m, 1, generator=g) / 100, torch.rand(n, 1, generator=g) / 100
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        acc = int8_mm(qx, qw, backend="fallback")  # [M, N] int32
        ref = acc.float() * xs * ws.reshape(1, -1) + bias.float()  # Int8Linear's order, fp32
        assert torch.equal(int8_gemm(qx, qw, xs, ws, bias, torch.float32), ref)
        assert torch.equal(int8_gemm(qx, qw, xs, ws, bias, torch.float16), ref.half())
        assert _ulps_bf16(int8_gemm(qx, qw, xs, ws, bias, torch.bfloat16), ref.bfloat16()) <= 1
        assert torch.equal(rescale(acc, xs, ws, bias, torch.float32), ref)
        accf = acc.float() * 0.37  # a float32 product (the fp8 fallback): only some of the terms
        assert torch.equal(rescale(accf, None, ws, None, torch.float32), accf * ws.reshape(1, -1))
        assert torch.equal(rescale(accf, None, None, bias, torch.float32), accf + bias.float())


def _interp_linear():
    from lowbit.kernels.fp8_gemm import fp8_linear
    from lowbit.kernels.int8_gemm import int8_linear

    for m, k, n in ODD:
        for static in (False, True):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                i8, f8 = _layers(k, n, dt, static=static)
                x = torch.randn(m, 2, k).to(dt)  # leading dims [M, 2]
                ref = i8(x)
                for backend in ("triton", "int_mm"):
                    y = int8_linear(x, i8.qweight, i8.w_scale, i8.bias, i8.act_scale, backend=backend)
                    assert y.shape == ref.shape and y.dtype == dt
                    # bf16: the interpreter's own f32 -> bf16 cast rounds differently (1 ulp); exact on GPU
                    assert _ulps_bf16(y, ref) <= 1 if dt == torch.bfloat16 else torch.equal(y, ref)
                y = fp8_linear(x, f8.qweight, f8.w_scale, f8.bias, f8.act_scale)  # CPU: the emulation
                assert torch.equal(y, f8(x)), (m, k, n, static, dt)


INTERP_CHECKS = {"quant": _interp_quant, "gemm": _interp_gemm, "epilogue": _interp_epilogue,
                 "linear": _interp_linear}


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs a working Triton CPU interpreter")
@pytest.mark.parametrize("check", sorted(INTERP_CHECKS))
def test_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, check], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU

def _gpu_shapes(n=28, seed=0):
    """Random (M, K, N): M 1..300, K and N multiples of 16 or odd, plus two Llama-sized decode/prefill."""
    g = torch.Generator().manual_seed(seed)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    ms = [1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 255, 256, 300]
    ks = [16, 48, 64, 72, 200, 256, 1000, 1024, 4096]
    ns = [16, 24, 100, 128, 250, 512, 1000, 2048]
    return [(pick(ms), pick(ks), pick(ns)) for _ in range(n)] + [(1, 4096, 4096), (300, 4096, 1024)]


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of the kernel entry points, to prove the layers dispatched to them."""
    from lowbit.kernels import fp8_gemm, int8_gemm
    calls = {"int8": 0, "fp8": 0}
    for mod, fn, key in ((int8_gemm, "int8_linear", "int8"), (fp8_gemm, "fp8_linear", "fp8")):
        orig = getattr(mod, fn)

        def wrapped(*a, _orig=orig, _key=key, **kw):
            calls[_key] += 1
            return _orig(*a, **kw)
        monkeypatch.setattr(mod, fn, wrapped)
    return calls


@pytest.mark.gpu
def test_gpu_quant_bit_exact():
    from lowbit.kernels.fp8_gemm import quant_fp8
    from lowbit.kernels.int8_gemm import quant_int8
    for m, k, _ in _gpu_shapes(seed=1):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            x = (torch.randn(m, k, device="cuda") * (1 + 10 * torch.rand(m, 1, device="cuda"))).to(dt)
            for static in (None, torch.tensor([0.03], device="cuda")):
                q, s = quant_int8(x, static)
                qr, sr = quantize_act_int8(x, static)
                assert torch.equal(q, qr) and torch.equal(s, sr.expand(m, 1)), (m, k, dt, static)
                q, s = quant_fp8(x, static)
                qr, sr = quantize_act_fp8(x, static)
                assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), (m, k, dt, static)
                assert torch.equal(s, sr.expand(m, 1))


@pytest.mark.gpu
def test_gpu_int32_sums_bit_exact():
    from lowbit.kernels.int8_gemm import int8_gemm
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in _gpu_shapes(seed=2):
        qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda", generator=g)
        qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda", generator=g)
        assert torch.equal(int8_gemm(qx, qw), int8_mm(qx, qw)), (m, k, n)  # vs torch._int_mm
    a = torch.full((3, 16384), -128, dtype=torch.int8, device="cuda")
    assert bool((int8_gemm(a, a) == 16384 * 16384).all())  # 2^28: no overflow, no float rounding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layers_match_reference(dtype, count_calls):
    g = torch.Generator().manual_seed(3)
    for i, (m, k, n) in enumerate(_gpu_shapes()):
        static, bias = bool(torch.randint(2, (1,), generator=g)), bool(torch.randint(2, (1,), generator=g))
        i8, f8 = _layers(k, n, dtype, bias=bias, static=static, device="cuda")
        x = torch.randn(m, k, generator=g).to("cuda", dtype)
        if i % 5 == 0:  # leading dims and a non-contiguous input
            x = torch.randn(k, 2, m, generator=g).to("cuda", dtype).permute(1, 2, 0)  # [2, M, K], stride != 1
        for layer in (i8, f8):
            y = layer(x)
            with kernels_disabled():
                ref = layer(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2 * float(ref.abs().max()),
                                       msg=f"{type(layer).__name__} {(m, k, n, static, bias)}")
            if layer is i8:  # same codes, same int32 sums, same epilogue order without FMA: same bytes
                assert torch.equal(y, ref), f"int8 {(m, k, n, static, bias)}: {(y.float() - ref.float()).abs().max()}"
    assert count_calls["int8"] == count_calls["fp8"] == len(_gpu_shapes())


@pytest.mark.gpu
def test_gpu_int8_int_mm_backend_and_fp8_fallback_bitwise():
    """int_mm backend == triton backend; fp8 tensor-wise fallback == the reference (it is its sequence)."""
    from lowbit.kernels.fp8_gemm import fp8_linear
    from lowbit.kernels.int8_gemm import int8_linear
    for m, k, n in [(1, 256, 128), (17, 4096, 1024), (300, 1024, 4096)]:
        for dtype in (torch.bfloat16, torch.float16):
            i8, f8 = _layers(k, n, dtype, device="cuda")
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = int8_linear(x, i8.qweight, i8.w_scale, i8.bias, backend="int_mm")
            assert torch.equal(y, int8_linear(x, i8.qweight, i8.w_scale, i8.bias))
            y = fp8_linear(x, f8.qweight, f8.w_scale, f8.bias, rowwise=False)
            with kernels_disabled():
                assert torch.equal(y, f8(x)), (m, k, n, dtype)


def test_fp8_per_token_reference_is_the_direct_computation():
    """per_token_act (compressed-tensors' FP8_DYNAMIC): each row's own absmax/448 step, float64 direct math."""
    _, f8 = _layers(256, 64, torch.float32)
    f8t = FP8Linear(256, 64, per_token_act=True, bias=f8.bias is not None, dtype=torch.float32)
    f8t.load_state_dict(f8.state_dict())
    x = torch.randn(7, 256) * torch.logspace(-2, 2, 7)[:, None]            # rows of very different ranges
    s = x.double().abs().amax(-1, keepdim=True) / 448                          # [7, 1]
    qx = (x.double() / s).to(torch.float8_e4m3fn).double() * s                 # [7, 256]
    want = qx @ f8.dequantized_weight(torch.float64).t() + (0 if f8.bias is None else f8.bias.double())
    y = f8t(x).double()
    assert (y - want).abs().max() < 1e-5 * want.abs().max()
    assert (f8(x).double() - want).abs().max() > 1e-3 * want.abs().max()   # per tensor is another result


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [True, False])
def test_gpu_fp8_per_token_matches_reference(rowwise):
    from lowbit.kernels.fp8_gemm import fp8_linear
    for m, k, n in [(1, 256, 128), (17, 4096, 1024), (300, 1024, 4096)]:
        _, f8 = _layers(k, n, torch.bfloat16, device="cuda")
        f8t = FP8Linear(k, n, per_token_act=True, bias=f8.bias is not None, dtype=torch.bfloat16, device="cuda")
        f8t.load_state_dict(f8.state_dict())
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * torch.logspace(-1, 1, m, device="cuda")[:, None].bfloat16()
        y = fp8_linear(x, f8t.qweight, f8t.w_scale, f8t.bias, rowwise=rowwise, per_token=True)
        with kernels_disabled():
            ref = f8t(x)
        torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2 * float(ref.abs().max()),
                                   msg=f"{(m, k, n, rowwise)}")


if __name__ == "__main__":  # the interpreter tests run one check per subprocess
    INTERP_CHECKS[sys.argv[1]]()
