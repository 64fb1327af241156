"""KV-cache quantization: round-trip bounds, cache == evaluation path, bytes saved."""
import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.layers.kv_quant import KVQuant


def test_roundtrip_bounded_by_scale():
    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0)) * 4
    q, s = KVQuant("int8").quantize(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 17, 1)
    err = (KVQuant("int8").roundtrip(x) - x).abs()
    assert (err <= s / 2 + 1e-6).all()                                   # round to nearest: half a step
    assert torch.allclose(s, x.abs().amax(-1, keepdim=True) / 127)
    f = KVQuant("fp8").roundtrip(x)
    rel = ((f - x).abs() / x.abs().amax(-1, keepdim=True))
    assert rel.max() <= 2 ** -4                                           # e4m3: 3 mantissa bits
    with pytest.raises(LowbitError, match="--kv-cache"):
        KVQuant("int4")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_cache_equals_quantized_full_forward(smollm2, wiki_ids, kind):
    """A prefill through the int8/fp8 cache gives exactly the logits of a full forward that quantizes K/V
    the same way (evaluation's path); decoding on top stays close to the full forward."""
    model = copy.deepcopy(smollm2[0])
    model.set_kv_quant(KVQuant(kind))
    ids = wiki_ids[:40][None]                                             # [1, 40]
    cache = model.new_cache(1, 40)
    with torch.no_grad():
        assert torch.equal(model(ids[:, :32], cache=cache), model(ids[:, :32]))
        steps = torch.stack([model(ids[:, t:t + 1], cache=cache)[0, -1] for t in range(32, 40)])
        full, plain = model(ids)[0, 32:], smollm2[0](ids)[0, 32:]        # [8, V]
    # Rounding makes K/V quantization discontinuous: the summation-order noise between a 1-token and a
    # 40-token attention can flip a code, so decode-vs-full agrees to quantization noise, not to the bit.
    assert (steps - full).abs().max() < 0.5 and (steps.argmax(-1) == full.argmax(-1)).all()
    assert (full - plain).abs().max() > 1e-3                              # quantization really happened


def test_bytes_per_token_saved(smollm2):
    model = copy.deepcopy(smollm2[0])
    fp32 = model.new_cache(1, 64).nbytes
    model.set_kv_quant(KVQuant("int8"))
    int8 = model.new_cache(1, 64).nbytes
    cfg = model.config
    assert int8 == 64 * KVQuant("int8").bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    assert int8 / fp32 == pytest.approx((64 + 4) / (64 * 4))              # hd=64: codes + one fp32 scale
