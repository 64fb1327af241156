"""QAT on the real model's weights: QATLinear rounds exactly as the layer it converts to; a short QAT run on a
2-block slice of SmolLM2 (real weights, cheap on a CPU) ends in WeightOnlyLinear layers that save and load
bit for bit; LLM-QAT's generated data follows its definition; the KV-cache STE passes gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import FakeQuantLinear, WeightOnlyLinear
from lowbit.train.data import self_generated
from lowbit.train.distill import shallow_copy
from lowbit.train.qat import QATConfig, STEKVQuant, convert_qat, prepare_qat, run_qat
from lowbit.train.qat_linear import QATLinear


@pytest.fixture(scope="module")
def real_linear(smollm2):
    """The real up_proj of block 3 (576 -> 1536: g128 leaves a short 64-wide last group)."""
    return smollm2[0].model.layers[3].mlp.up_proj


@pytest.fixture
def tiny(smollm2):
    """A 2-block slice of the real model (blocks 0 and 1), a fresh copy per test."""
    return shallow_copy(smollm2[0], [0, 1])


SPECS = [QuantSpec(4, False, 128), QuantSpec(3, True, 128), QuantSpec(4, False, 32, "float"), QuantSpec(4, False, -1)]


@pytest.mark.parametrize("learn", [False, True], ids=["minmax", "lsq"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_conversion_reproduces_the_training_forward(real_linear, spec, learn):
    layer = QATLinear.from_linear(real_linear, spec, learn_scales=learn)
    with torch.no_grad():   # move the latent weights and scales off their starting point
        layer.weight.add_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2)) * 1e-3)
        if learn:
            layer.scale.mul_(0.9)
    x = torch.randn(3, 7, 576, generator=torch.Generator().manual_seed(0))
    want = layer(x)
    q = layer.to_quantized()
    assert isinstance(q, WeightOnlyLinear)
    assert torch.allclose(q.dequantized_weight(), layer.quantized_weight().detach(), rtol=0, atol=1e-6)
    assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)


def test_int8_activation_conversion(real_linear):
    layer = QATLinear.from_linear(real_linear, QuantSpec(4, False, 128), act_bits=8)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(1))
    q = layer.to_quantized()
    assert isinstance(q, FakeQuantLinear) and q.act == "int8"
    assert torch.allclose(q(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="--act-bits"):
        QATLinear.from_linear(real_linear, QuantSpec(4, False, 128), act_bits=4)


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.tag)
def test_a_ptq_layer_round_trips_through_qat_unchanged(real_linear, spec):
    ptq = WeightOnlyLinear.from_linear(real_linear, spec)
    back = QATLinear.from_weight_only(ptq, learn_scales=True).to_quantized()
    assert torch.equal(back.codes(), ptq.codes()) and torch.equal(back.scale, ptq.scale)


def test_kv_cache_ste_passes_gradients(tiny):
    prepare_qat(tiny, QATConfig(bits=4, group_size=128, kv_cache="int8"))
    assert isinstance(tiny.kv_quant, STEKVQuant)
    ids = torch.arange(100, 116)[None]
    tiny(ids).logsumexp(-1).mean().backward()
    k = tiny.model.layers[1].self_attn.k_proj
    assert isinstance(k, QATLinear) and k.weight.grad is not None and k.weight.grad.abs().sum() > 0
    assert convert_qat(tiny) == 14 and type(tiny.kv_quant).__name__ == "KVQuant"


def test_self_generated_data_is_llm_qat_sampling(tiny):
    seqs = self_generated(tiny, n=3, length=12, top_k=5, greedy_first=3, seed=0, progress=False)
    again = self_generated(tiny, n=3, length=12, top_k=5, greedy_first=3, seed=0, progress=False)
    assert seqs.shape == (3, 12) and torch.equal(seqs, again)
    with torch.no_grad():
        logits = tiny(seqs)                                                       # [3, 12, V]: no cache
    for t in range(1, 4):   # tokens 1..3 are the argmax of the model given the prefix
        assert torch.equal(seqs[:, t], logits[:, t - 1].argmax(-1))
    top5 = logits[:, 3:-1].topk(5, -1).indices                                    # [3, 8, 5]
    assert bool((seqs[:, 4:, None] == top5).any(-1).all())                        # later ones from the top-5


def test_qat_trains_converts_saves_and_loads(tiny, smollm2, calib_path, wiki_test_path, tmp_path):
    from lowbit.eval.perplexity import window_stats
    from lowbit.models.loader import load
    from lowbit.text import random_windows, read_text, tokenize_text

    tok = smollm2[1]
    teacher = shallow_copy(smollm2[0], [0, 1])
    ids = random_windows(tokenize_text(tok, read_text(wiki_test_path)[:20000]), 2, 64, seed=7)  # [2, 64] held out

    def kl(model):
        with torch.no_grad():
            return sum(window_stats(model(ids[i:i + 1])[0], ids[i, 1:], teacher(ids[i:i + 1])[0])["kl"]
                       for i in range(2))

    rtn = shallow_copy(smollm2[0], [0, 1])
    prepare_qat(rtn, QATConfig(bits=3, group_size=128))
    convert_qat(rtn)
    cfg = QATConfig(bits=3, group_size=128, steps=12, batch_size=2, seqlen=64, lr=2e-4, learn_scales=True)
    log, desc = run_qat(tiny, tok, cfg, str(calib_path), progress=False)
    assert all(isinstance(m, WeightOnlyLinear) for m in tiny.model.layers.modules()
               if isinstance(m, (nn.Linear, WeightOnlyLinear, QATLinear)))
    # 12 LSQ steps on these 2 blocks: 0.70x the KL of RTN's 3-bit grid on held-out windows (measured 19.6 vs
    # 28.0, summed over 126 tokens); 0.9 leaves room for a library's numerics without admitting no training
    assert kl(tiny) < 0.9 * kl(rtn)
    out = tiny.save_pretrained(tmp_path / "q", tok, method={"method": "qat", **cfg.to_dict()}, calibration=desc,
                               save_dtype=None)   # the trained norms as they are: an exact copy
    back, _ = load(out, dtype="fp32")
    with torch.no_grad():
        assert torch.equal(back(ids), tiny(ids))
