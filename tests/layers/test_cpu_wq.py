"""WeightOnlyLinear's CPU kernels (lowbit.kernels.cpu_wq: lowbit's C kernel and PyTorch's) against its
dequantize reference path, on real SmolLM2 layers: the kernel's own weight (read back through an identity input)
and its outputs against float64."""
from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import kernels_disabled
from lowbit.kernels.cpu_wq import build_c_kernel, c_kernel, cpu_linear, cpu_pack, has_aten_kernels
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import WeightOnlyLinear

BACKENDS = [pytest.param("c", marks=pytest.mark.skipif(c_kernel() is None, reason="no C compiler here")),
            pytest.param("aten", marks=pytest.mark.skipif(not has_aten_kernels(), reason="no PyTorch CPU kernels"))]
# q_proj 576->576, k_proj 576->192 (GQA), down_proj 1536->576: every matmul shape of the model but the head.
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
K576, K1536 = 576, 1536
MAPS = {  # backend -> spec -> (kernel, kernel group size for K=576, for K=1536)
    "c": {
        QuantSpec(8, True, -1): ("q8", K576, K1536),        # per channel: one group per row
        QuantSpec(8, True, 32): ("q8", 32, 32),              # the Q8_0 grid
        QuantSpec(8, False, -1): ("q8", K576, K1536),        # 8-bit asymmetric: codes shifted by 128
        QuantSpec(6, True, -1): ("q8", K576, K1536),
        QuantSpec(5, False, 32): ("q8", 32, 32),
        QuantSpec(4, False, 32): ("q4", 32, 32),
        QuantSpec(4, False, 64): ("q4", 64, 64),
        QuantSpec(4, False, 128): ("q4", 64, 128),           # 576 = 4 x 128 + 64: kernel groups of 64
        QuantSpec(4, True, 32): ("q4", 32, 32),              # the Q4_0 grid
        QuantSpec(4, False, 32, "float"): ("q4", 32, 32),    # the Q4_1 grid
        QuantSpec(4, False, -1): ("q4", K576, K1536),
        QuantSpec(3, False, 128): ("q4", 64, 128),
        QuantSpec(2, True, 64): ("q4", 64, 64),
    },
    "aten": {
        QuantSpec(8, True, -1): ("int8", 0, 0),
        QuantSpec(4, False, 32): ("int4", 32, 32),
        QuantSpec(4, False, 64): ("int4", 64, 64),
        QuantSpec(4, False, 128): ("int4", 64, 128),
        QuantSpec(4, True, 32): ("int4", 32, 32),
        QuantSpec(4, False, 32, "float"): ("int4", 32, 32),
        QuantSpec(4, False, -1): ("int4", 64, 256),          # per channel: one scale repeated over kernel groups
        QuantSpec(3, False, 128): ("int4", 64, 128),
        QuantSpec(2, True, 64): ("int4", 64, 64),
    },
}
ATEN_SLOW = (QuantSpec(8, True, 32), QuantSpec(8, False, -1), QuantSpec(5, False, 32), QuantSpec(6, True, -1))
CASES = [pytest.param(b, spec, id=f"{b}-{spec.tag}") for b in ("c", "aten") for spec in MAPS[b]]
# |kernel - float64| / |float32 reference - float64| measured on these layers: up to ~10 (the kernels sum in
# another order, per group); 1e-4 absolute on outputs of magnitude ~1-10 leaves a margin of 2x over the worst.
OUT_ATOL = 1e-4


def _skip_missing(backend):
    if backend == "c" and c_kernel() is None:
        pytest.skip("no C compiler here")
    if backend == "aten" and not has_aten_kernels():
        pytest.skip("this PyTorch has no CPU weight-only kernels")


@pytest.fixture(scope="module")
def block(smollm2):
    return smollm2[0].model.layers[3]


def _layer(block, name, spec, dtype):
    """The block's projection quantized with spec, plus a bias (SmolLM2 has none) so the bias add is tested."""
    ref = WeightOnlyLinear.from_linear(block.get_submodule(name), spec, dtype=dtype)
    bias = torch.randn(ref.out_features, generator=torch.Generator().manual_seed(0))
    return WeightOnlyLinear.from_quantized(ref.codes(), ref.scale, ref.zero, spec, bias, g_idx=ref.g_idx, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("backend,spec", CASES)
def test_kernel_weight_and_output_match_reference(block, name, backend, spec, dtype):
    _skip_missing(backend)
    layer = _layer(block, name, spec, dtype)
    packed = cpu_pack(layer, backend)
    kind, g576, g1536 = MAPS[backend][spec]
    assert packed is not None and packed.kind == kind
    assert packed.group_size == (g576 if layer.in_features == 576 else g1536)
    ref_w = layer.dequantized_weight()                                            # [N, K] fp32
    # The kernel's weight, read back exactly: an identity input makes each output one product w * 1.
    kw = cpu_linear(torch.eye(layer.in_features), packed, layer.out_features).T    # [N, K]
    if dtype == torch.float16:  # fp16 scales: (8 - z)*s and z + 8*s are exact in fp32, so is the weight
        assert torch.equal(kw, ref_w)
    else:  # fp32 scales: the offset rounds once more (a few ulp)
        assert torch.allclose(kw, ref_w, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(ref_w.abs().max()))
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    y = cpu_linear(x[None], packed, layer.out_features, layer.bias)               # [1, 5, N]
    ref = x.double() @ ref_w.double().T + layer.bias.double()                     # float64
    assert y.shape == (1, 5, layer.out_features) and y.dtype == torch.float32
    assert float((y[0].double() - ref).abs().max()) < OUT_ATOL
    with kernels_disabled():
        y_ref = layer(x[None])                                                    # the dequantize path
    assert float((y - y_ref).abs().max()) < OUT_ATOL


def test_layer_forward_takes_the_default_kernel(block):
    """WeightOnlyLinear.forward on fp32 CPU input runs the default backend's kernel, for one row and a prefill."""
    layer = _layer(block, "mlp.down_proj", QuantSpec(4, True, 32), torch.float16)
    packed = layer.cpu_weight()
    assert packed is not None and packed.kind == ("q4" if c_kernel() is not None else "int4")
    for rows in (1, 64):
        x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(rows))
        want = (cpu_linear(x, packed, 576, layer.bias) if rows <= packed.max_rows
                else F.linear(x, layer.dequantized_weight(torch.float32), layer.bias))
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize("spec", ATEN_SLOW, ids=lambda s: s.tag)
def test_grids_without_an_aten_kernel(block, spec):
    _skip_missing("aten")
    layer = _layer(block, "self_attn.q_proj", spec, torch.float16)
    assert cpu_pack(layer, "aten") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_act_order_g_idx_breaking_kernel_groups_has_no_kernel(block, backend):
    spec = QuantSpec(4, False, 32)
    ref = _layer(block, "self_attn.q_proj", spec, torch.float16)
    perm = torch.randperm(576, generator=torch.Generator().manual_seed(3))
    layer = WeightOnlyLinear.from_quantized(ref.codes(), ref.scale, ref.zero, spec, ref.bias,
                                            g_idx=perm // 32, dtype=torch.float16)
    assert cpu_pack(layer, backend) is None and layer.cpu_weight() is None
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(2))
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(torch.float32), layer.bias.float()))
    # a g_idx that keeps runs of 32 columns in one group (a permutation of whole groups) still maps
    blocks = torch.randperm(18, generator=torch.Generator().manual_seed(4))
    g_idx = blocks.repeat_interleave(32)
    layer = WeightOnlyLinear.from_quantized(ref.codes(), ref.scale, ref.zero, spec, ref.bias, g_idx=g_idx,
                                            dtype=torch.float16)
    packed = cpu_pack(layer, backend)
    assert packed is not None and packed.group_size == 32
    kw = cpu_linear(torch.eye(576), packed, 576).T
    assert torch.equal(kw, layer.dequantized_weight())


def test_packed_copy_follows_the_buffers(block):
    spec = QuantSpec(4, False, 64)
    layer = _layer(block, "mlp.down_proj", spec, torch.float16)
    other = _layer(block, "mlp.up_proj", QuantSpec(4, False, 64), torch.float16)
    x = torch.randn(1, 1536, generator=torch.Generator().manual_seed(5))
    first = layer.cpu_weight()
    assert layer.cpu_weight() is first                       # cached between calls
    layer.scale.mul_(2)                                      # an in-place write (what load_state_dict does)
    y = layer(x)
    assert layer.cpu_weight() is not first
    with kernels_disabled():
        assert float((y - layer(x)).abs().max()) < OUT_ATOL
    assert other.cpu_weight() is not None


def test_gradients_and_other_dtypes_take_the_reference_path(block):
    layer = _layer(block, "self_attn.q_proj", QuantSpec(4, False, 32), torch.float16)
    x = torch.randn(2, 576, requires_grad=True)
    layer(x).sum().backward()                                # the kernels have no backward: must not be used
    assert x.grad is not None and x.grad.shape == x.shape
    xb = torch.randn(2, 576).bfloat16()
    assert torch.equal(layer(xb), F.linear(xb, layer.dequantized_weight(torch.bfloat16), layer.bias.bfloat16()))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set paths")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "scalar"])
@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32), QuantSpec(4, False, 64, "float"), QuantSpec(8, True, -1),
                                  QuantSpec(8, False, 32)], ids=lambda s: s.tag)
def test_c_kernel_avx2_and_portable_paths(block, march, spec):
    """The same C source built without AVX-512 (AVX2) and without any vector extension: the same weights
    exactly, and the same outputs within the float64 bound, as on this CPU."""
    _skip_missing("c")
    try:
        lib = build_c_kernel(march)
    except RuntimeError:
        # Skip only when the compiler cannot target `march` at all; an error in lowbit's source must fail.
        probe = subprocess.run([os.environ.get("CC", "cc"), f"-march={march}", "-x", "c", "-c", "-", "-o", os.devnull],
                               input="int f(void) { return 0; }\n", capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"the compiler cannot target {march}")
        raise
    layer = _layer(block, "mlp.down_proj", spec, torch.float16)
    packed = cpu_pack(layer, "c")
    kw = cpu_linear(torch.eye(layer.in_features), packed, layer.out_features, lib=lib).T
    assert torch.equal(kw, layer.dequantized_weight())
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(7))
    y = cpu_linear(x, packed, layer.out_features, layer.bias, lib=lib)
    ref = x.double() @ layer.dequantized_weight().double().T + layer.bias.double()
    assert float((y.double() - ref).abs().max()) < OUT_ATOL


def test_missing_compiler_is_one_clear_error_and_no_cache_entry(tmp_path, monkeypatch):
    """A build that cannot run says why, and leaves nothing behind in the cache (c_kernel() then warns and
    falls back to PyTorch's kernels)."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        build_c_kernel()
    assert not list((tmp_path / "cache" / "kernels").iterdir())
