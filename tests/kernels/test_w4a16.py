"""Marlin-class W4A16: the layout against its definition and the Triton layout (CPU, in CI), the CUDA
kernel against a float64 matmul of the reference dequantization (GPU, marked)."""
from __future__ import annotations

import pytest
import torch

from kernels.test_wq_gemm import make_layer
from lowbit.kernels.w4a16 import eligible, marlin_dequantize, marlin_repack
from lowbit.kernels.wq_gemm import dequantize_packed, repack, unpack_codes

# (bits, group_size, symmetric, zero_point, in_features, out_features, act_order)
CASES = [
    (4, 128, False, "int", 256, 64, False),
    (4, 128, False, "float", 576, 576, False),   # SmolLM2's ragged 576 = 4 * 128 + 64
    (4, 64, True, "int", 1536, 192, False),
    (4, 64, False, "int", 576, 64, False),       # 9 groups of 64: padded to 640 with a zero group
    (4, -1, False, "int", 576, 96, False),       # one group (per channel)
    (4, -1, False, "int", 208, 32, False),       # K not a multiple of 64: padded
    (4, 128, False, "int", 512, 64, True),       # act order: columns sorted by group
]
IDS = [f"g{c[1]}{'s' if c[2] else c[3]}K{c[4]}N{c[5]}{'act' if c[6] else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layout_follows_its_definition(case):
    layer = make_layer(*case)
    pw = repack(layer)
    assert eligible(pw)
    mw = marlin_repack(pw)
    codes = unpack_codes(pw).t()                                           # [N, Kp] kernel order
    words = mw.qweight.long() & 0xFFFFFFFF                                 # [N/16, Kc, 32, 4]
    g = torch.Generator().manual_seed(1)
    nib = (0, 4, 2, 6)
    for _ in range(300):  # the docstring's formula, one code at a time
        n = int(torch.randint(codes.shape[0], (1,), generator=g))
        k = int(torch.randint(codes.shape[1], (1,), generator=g))
        rb, r = divmod(n, 16)
        h, gg = divmod(r, 8)
        c, kk = divmod(k, 64)
        t, rest = divmod(kk, 16)
        st, e = divmod(rest, 4)
        word = int(words[rb, c, 4 * gg + t, st])
        assert (word >> (4 * (h + nib[e]))) & 0xF == int(codes[n, k])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dequantization_equals_triton_layout(case):
    pw = repack(make_layer(*case))
    mw = marlin_repack(pw)
    ref = dequantize_packed(pw)                                            # [N, K] original order
    if pw.perm is not None:
        ref = ref[:, pw.perm]                                              # kernel column order
    assert torch.equal(marlin_dequantize(mw), ref)
    assert mw.padded_in % 128 == 0 and mw.nbytes == mw.qweight.numel() * 4 + mw.scale_offset.numel() * 2


def test_not_eligible():
    assert not eligible(repack(make_layer(4, 32, False, "int", 128, 32, False)))   # group 32 < 64
    assert not eligible(repack(make_layer(4, 128, False, "int", 128, 48, False)))  # N % 32 != 0
    assert not eligible(repack(make_layer(8, 128, False, "int", 128, 32, False)))  # 8-bit


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_matches_float64(dtype):
    from lowbit.kernels import w4a16
    if not w4a16.available():
        pytest.skip("the CUDA kernel could not be built here (no nvcc)")
    worst = {}
    shapes = CASES + [(4, 128, False, "int", 4096, 4096, False), (4, 128, False, "int", 14336, 1024, True)]
    for case in shapes:
        pw = repack(make_layer(*case, dtype=torch.float16).cuda())
        mw = pw.marlin
        assert mw is not None
        w = marlin_dequantize(mw, torch.float64)                           # [N, K]
        for M in (1, 2, 8, 9, 16, 17, 32, 33, 64):
            x = torch.randn(M, case[4], device="cuda", dtype=dtype)
            ref = x.double() @ w.t()
            for split in (None, 1, 2, 4):
                y = w4a16.w4a16_linear(x, mw, split)
                assert torch.equal(y, w4a16.w4a16_linear(x, mw, split))  # split-K adds in a fixed order
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                worst[(case[4], case[5], M, split)] = err
    # bf16 output rounding is 2^-9 relative; fp16 2^-12; fp32 accumulation adds far less
    bound = 8e-3 if dtype == torch.bfloat16 else 2e-3
    bad = {k: v for k, v in worst.items() if v > bound}
    assert not bad, bad
