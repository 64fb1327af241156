"""Our GGUF dequantizers against the `gguf` package's own, type by type."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lowbit.errors import LowbitError
from lowbit.models.gguf_dequant import DEQUANTIZERS, dequantize


def test_real_tensors_of_default_model(default_path):
    """Every tensor type in SmolLM2's file (Q4_1, Q8_0, F32) matches gguf's dequantizer bit for bit."""
    reader = GGUFReader(default_path)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        shape = tuple(int(x) for x in reversed(t.shape))
        ref = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
        assert torch.equal(dequantize(t.data, t.tensor_type.name, shape), ref), t.name
    assert seen == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_types_gguf_can_quantize(name):
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32) * 3
    qt = GGMLQuantizationType[name]
    data = gguf_quantize(x, qt)
    ref = gguf_dequantize(data, qt).astype(np.float32)
    ours = dequantize(data, name, (6, 256)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours - x).max() < np.abs(x).max() * 0.2  # and it is a plausible reconstruction


def test_f16():
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float16)
    np.testing.assert_array_equal(dequantize(x, "F16", (3, 64)).numpy(), x.astype(np.float32))


@pytest.mark.parametrize("name,d_offsets", [("Q4_K", (0, 2)), ("Q6_K", (208,))])
def test_k_quants_random_blocks(name, d_offsets):
    """gguf cannot quantize K-quants; random blocks (with finite fp16 super-scales) exercise every bit."""
    qt = GGMLQuantizationType[name]
    block, nbytes = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(5, 3, nbytes), dtype=np.uint8)            # [rows, blocks, bytes]
    for off in d_offsets:
        d = rng.uniform(-0.1, 0.1, size=(5, 3)).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(5, 3, 2)
    raw = raw.reshape(5, 3 * nbytes)
    ref = gguf_dequantize(raw, qt).astype(np.float32)
    ours = dequantize(raw, name, (5, 3 * block)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_required_types_supported():
    for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"]:
        assert t in DEQUANTIZERS


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q5_K", "IQ2_XXS", "IQ4_NL", "TQ2_0", "MXFP4"])
def test_other_types_through_gguf(name):
    """Types without a torch path here dequantize through gguf.quants (random blocks, finite fp16 scales)."""
    qt = GGMLQuantizationType[name]
    block, nbytes = GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(3).integers(0, 256, size=(3, 2 * nbytes), dtype=np.uint8)
    raw.view(np.uint16)[...] &= 0x3BFF  # every fp16 field finite and small, whatever its offset in the block
    ref = gguf_dequantize(raw, qt).astype(np.float32)
    np.testing.assert_array_equal(dequantize(raw, name, (3, 2 * block)).numpy(), ref)


def test_unsupported_type_and_bad_shape():
    with pytest.raises(LowbitError, match="unsupported GGUF tensor type Q8_K"):
        dequantize(np.zeros((1, 292), np.uint8), "Q8_K", (1, 256), "blk.0.x")
    with pytest.raises(LowbitError, match="unsupported GGUF tensor type I32"):
        dequantize(np.zeros((1, 4), np.int32), "I32", (1, 4), "blk.0.x")
    with pytest.raises(LowbitError, match="expected shape"):
        dequantize(np.zeros((2, 34), np.uint8), "Q8_0", (2, 64), "t")
