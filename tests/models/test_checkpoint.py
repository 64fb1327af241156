"""lowbit's checkpoint format: as small as its bits (unquantized tensors in 16-bit by default), read back
through the one build_model."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.layers import WeightOnlyLinear
from lowbit.models.loader import load
from lowbit.quant.api import quantize


@pytest.fixture(scope="module")
def rtn_w4(smollm2):
    model = copy.deepcopy(smollm2[0])
    return model, quantize(model, "rtn", bits=4, group_size=128, progress=False)


def _fp16_bytes(model) -> int:
    return 2 * sum(p.numel() for p in model.parameters())


def test_default_checkpoint_is_as_small_as_its_bits(smollm2, rtn_w4, tmp_path):
    """W4 g128 of the default model: 4.3 bits for the block Linears, 16 for the 28 M-parameter embedding and
    the norms -> 0.425x the fp16 model (0.63x when the embedding was saved in fp32)."""
    model, res = rtn_w4
    out = res.save(model, smollm2[1], tmp_path / "q")
    ratio = (out / "model.safetensors").stat().st_size / _fp16_bytes(smollm2[0])
    assert 0.41 < ratio < 0.44, ratio
    q = json.loads((out / "quantization_config.json").read_text())
    assert q["save_dtype"] == "fp16"
    loaded, _ = load(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32      # loaded in the requested dtype
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.half().float())
    for name, m in loaded.named_modules():
        if isinstance(m, WeightOnlyLinear):                              # the packed layers are stored as they are
            ref = model.get_submodule(name)
            assert torch.equal(m.dequantized_weight(), ref.dequantized_weight())


@pytest.mark.parametrize("save_dtype, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_save_dtype_choices(smollm2, rtn_w4, tmp_path, save_dtype, dtype):
    from safetensors import safe_open
    model, res = rtn_w4
    out = res.save(model, None, tmp_path / save_dtype, save_dtype=save_dtype)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == dtype
        assert f.get_tensor("model.norm.weight").dtype == dtype
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scale").dtype == torch.float16   # the layer's own


def test_unknown_save_dtype_is_refused(smollm2, rtn_w4, tmp_path):
    from lowbit.errors import LowbitError
    model, res = rtn_w4
    with pytest.raises(LowbitError, match="--save-dtype: expected one of fp16, bf16, fp32, got 'int4'"):
        res.save(model, None, tmp_path / "x", save_dtype="int4")
    assert not (tmp_path / "x").exists()
