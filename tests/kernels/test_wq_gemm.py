"""WkA16 Triton GEMM: the repacked layout against the layer's reference dequantization (CPU, in CI),
the kernels under Triton's interpreter (CPU, when Triton is installed) and on the GPU (marked)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

try:
    from helpers import triton_interpreter_ok
except ImportError:  # this file run as a script inside the interpreter subprocess
    def triton_interpreter_ok() -> bool:
        return True
import torch

from lowbit.kernels import kernels_disabled
from lowbit.kernels.wq_gemm import dequantize_packed, repack
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec

# (bits, group_size, symmetric, zero_point, in_features, out_features, act_order)
CASES = [
    (4, 128, False, "int", 256, 48, False),
    (4, 32, True, "int", 96, 40, False),
    (8, -1, True, "int", 64, 33, False),
    (4, 128, False, "float", 576, 64, False),   # SmolLM2's ragged 576 = 4 * 128 + 64
    (2, 64, False, "int", 128, 16, False),
    (4, 32, False, "int", 128, 32, True),
    (4, -1, False, "int", 576, 24, False),
]


def make_layer(bits, gs, sym, zp, K, N, act, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.02)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.01)
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=sym, zero_point=zp)
    layer = WeightOnlyLinear.from_linear(lin, spec, dtype=dtype)
    if act:  # act order: a random column -> group map, as GPTQ's act-order produces
        gidx = torch.randperm(K, generator=g) // gs
        layer = WeightOnlyLinear.from_quantized(layer.codes(), layer.scale, layer.zero, spec, lin.bias,
                                                g_idx=gidx, dtype=dtype)
    return layer


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}g{c[1]}{'s' if c[2] else c[3]}{c[4]}{'act' if c[6] else ''}")
def test_repack_equals_reference_dequantization(case):
    layer = make_layer(*case)
    pw = repack(layer)
    assert pw is not None and pw.padded_in % pw.group == 0
    ref = layer.dequantized_weight()                                      # [N, K] float32
    got = dequantize_packed(pw)
    # The kernel stores offset = -scale * zero in fp16: one fp16 rounding of a value <= 2^b * scale.
    bound = 2.0 ** -10 * (2 ** case[0]) * layer.scale.float().abs().max()
    assert (got - ref).abs().max() <= bound
    G = pw.padded_in // pw.group  # bytes: packed codes + an fp16 scale and offset per group and column
    assert pw.nbytes == pw.padded_in * layer.out_features * case[0] // 8 + 2 * 2 * G * layer.out_features


def test_three_bit_and_cpu_keep_reference_path():
    assert repack(make_layer(3, 32, False, "int", 64, 16, False)) is None
    layer = make_layer(4, 32, False, "int", 64, 16, False)
    x = torch.randn(3, 64, dtype=torch.float16)
    with kernels_disabled():
        ref = layer(x)
    assert torch.equal(layer(x), ref)  # CPU: the dispatch falls back to the reference


INTERP = textwrap.dedent("""
    import torch, sys
    sys.path.insert(0, {tests!r})
    from kernels.test_wq_gemm import CASES, make_layer
    from lowbit.kernels.wq_gemm import repack, wq_linear, dequantize_weight, dequantize_packed
    worst = 0.0
    for case in CASES:
        layer = make_layer(*case, dtype=torch.float32)
        pw = repack(layer)
        for M, cfg in ((1, dict(GEMV=False, BLOCK_N=32, SPLIT=1, UNPACK_3D=True)), (1, dict(BLOCK_N=16, SPLIT=3)),
                       (1, None), (5, dict(BLOCK_N=16, SPLIT=2, UNPACK_3D=False)),
                       (17, dict(BLOCK_N=32, SPLIT=3, UNPACK_3D=True))):
            x = torch.randn(M, case[4])
            y, ref = wq_linear(x, pw, layer.bias, cfg), x @ dequantize_packed(pw).t() + layer.bias
            worst = max(worst, float((y - ref).abs().max() / ref.abs().max()))
        w = dequantize_weight(pw, torch.float32)[:case[4]].t()            # kernel column order
        d = dequantize_packed(pw)
        assert torch.equal(w, d if pw.perm is None else d[:, pw.perm])
    print(worst)
""")


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs a working Triton CPU interpreter")
def test_kernels_under_triton_interpreter():
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", INTERP.format(tests=tests)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_matches_reference(dtype):
    worst = {}
    shapes = CASES + [(4, 128, False, "int", 4096, 1024, False), (4, 128, True, "int", 2048, 4096, True),
                      (8, 128, False, "int", 1024, 2000, False), (4, 64, False, "float", 1536, 576, False)]
    for case in shapes:
        layer = make_layer(*case, dtype=torch.float16).cuda()
        for M in (1, 3, 16, 17, 33, 64, 129, 300):
            x = torch.randn(M, case[4], device="cuda", dtype=dtype)
            y = layer(x)
            with kernels_disabled():
                ref = layer(x)
            err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            worst[(case, M)] = err
    bad = {k: v for k, v in worst.items() if v > 2e-2}
    assert not bad, bad
