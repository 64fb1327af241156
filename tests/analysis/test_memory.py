"""Parameter counts and memory formulas, checked against HF transformers and the literature."""
import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lowbit.analysis import (activation_memory, kv_cache_bytes, kv_cache_bytes_per_token,
                             kv_cache_summary, param_counts, weight_memory, weight_memory_table)
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32)
SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, tie_word_embeddings=True)
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, rope_theta=500000.0)


def hf_numel(cfg: ModelConfig, qwen2: bool = False) -> int:
    """Parameters of the HF model built on the meta device (no memory, no init cost)."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("meta"):
        if qwen2:
            model = Qwen2ForCausalLM(Qwen2Config(**kw))
        else:
            model = LlamaForCausalLM(LlamaConfig(attention_bias=cfg.attention_bias,
                                                 mlp_bias=cfg.mlp_bias, **kw))
    # .parameters() de-duplicates shared tensors, so a tied lm_head is counted once.
    return sum(p.numel() for p in model.parameters())


def test_llama7b_params_match_hf_exactly():
    total = param_counts(LLAMA_7B).total
    assert total == hf_numel(LLAMA_7B)
    assert total == pytest.approx(6.74e9, rel=1e-3)


def test_smollm2_gqa_tied_params_match_hf_exactly():
    pc = param_counts(SMOLLM2_135M)
    assert pc.lm_head == 0                      # tied: counted once, in embeddings
    assert pc.total == 134_515_008 == hf_numel(SMOLLM2_135M)


def test_llama3_8b_params():
    assert param_counts(LLAMA3_8B).total == 8_030_261_248


def test_biases_match_hf_llama_and_qwen2():
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                 num_kv_heads=2)
    llama_b = ModelConfig(attention_bias=True, mlp_bias=True, **small)
    assert param_counts(llama_b).total == hf_numel(llama_b)     # Llama: o_proj has a bias too
    # Qwen2's config.json says nothing of biases; its architecture record gives q/k/v biases, no o_proj bias
    from lowbit.models.arch import config_from_hf
    qwen = config_from_hf({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 48,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert (qwen.attention_bias, qwen.attention_out_bias) == (True, False)
    assert param_counts(qwen).total == hf_numel(qwen, qwen2=True)   # Qwen2: q/k/v bias only


def test_components_sum_to_total():
    pc = param_counts(LLAMA_7B)
    assert pc.embeddings == pc.lm_head == 32000 * 4096
    assert pc.norms == 32 * 2 * 4096 + 4096
    assert pc.attention == 32 * 4 * 4096 * 4096
    assert pc.mlp == 32 * 3 * 4096 * 11008
    assert pc.block_linear_weights == pc.attention + pc.mlp
    assert pc.to_dict()["total"] == pc.total


def test_kv_cache_literature_example():
    # Llama-7B, b=64, s=2048, fp16: 2 * 64 * 2048 * 4096 * 32 * 2 bytes = 68.7 GB
    kv = kv_cache_bytes(LLAMA_7B, batch=64, seqlen=2048, bytes_per_elem=2)
    assert kv == 2 * 64 * 2048 * 4096 * 32 * 2 == 68_719_476_736
    assert kv_cache_bytes_per_token(LLAMA_7B) == 2 * 32 * 4096 * 2 == 524_288   # 0.5 MB/token


def test_gqa_saving_scales_with_kv_heads():
    mha = kv_cache_bytes(dataclasses.replace(LLAMA3_8B, num_kv_heads=32), 4, 1000)
    gqa = kv_cache_bytes(LLAMA3_8B, 4, 1000)
    assert gqa * 32 == mha * 8                  # bytes ∝ n_kv_heads
    s = kv_cache_summary(LLAMA3_8B, 4, 1000)
    assert s["mha_bytes"] == mha and s["saving_factor"] == 4.0 and s["saved_bytes"] == mha - gqa
    s = kv_cache_summary(SMOLLM2_135M, 1, 10)
    assert s["mha_bytes"] == 3 * s["bytes"]


def test_weight_memory_dense():
    t = weight_memory_table(LLAMA_7B)
    n = param_counts(LLAMA_7B).total
    assert t["fp32"]["total_bytes"] == 4 * n
    assert t["fp16"]["total_bytes"] == 2 * n
    assert t["fp16"]["quantized_params"] == 0


def test_weight_memory_int4_by_hand():
    cfg = ModelConfig(vocab_size=10, hidden_size=256, intermediate_size=384, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    w = weight_memory(cfg, 4, group_size=128)
    # linears [out, in]: q 256x256, k 128x256, v 128x256, o 256x256, gate/up 384x256, down 256x384
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (384, 256), (384, 256), (256, 384)]
    q = sum(o * i for o, i in shapes)
    groups = sum(o * math.ceil(i / 128) for o, i in shapes)
    assert w["quantized_params"] == q
    assert w["quantized_weight_bytes"] == q // 2
    assert w["scale_bytes"] == 2 * groups            # fp16 scale per group
    assert w["zero_bytes"] == groups // 2            # 4-bit zero point per group
    rest = 10 * 256 * 2 + 3 * 256                    # embed + lm_head + 3 norms
    assert w["unquantized_bytes"] == 2 * rest
    assert w["total_bytes"] == q // 2 + 2 * groups + groups // 2 + 2 * rest
    assert w["bits_per_quantized_weight"] == pytest.approx(4 + (16 + 4) / 128)
    assert "lm_head" in w["quantized"] and "16-bit" in w["quantized"]
    sym = weight_memory(cfg, 4, group_size=128, symmetric=True)
    assert sym["zero_bytes"] == 0
    per_channel = weight_memory(cfg, 8, group_size=-1)
    assert per_channel["scale_bytes"] == 2 * sum(o for o, _ in shapes)


def test_int4_llama7b_is_about_a_quarter():
    t = weight_memory_table(LLAMA_7B, group_size=128)
    ratio = t["int4"]["total_bytes"] / t["fp16"]["total_bytes"]
    assert 0.25 < ratio < 0.40      # 4.16 bits/weight on ~96% of params, 16-bit embeddings/head


def test_activation_memory():
    a = activation_memory(LLAMA_7B, batch=2, seqlen=128)
    assert a["residual_stream"] == 2 * 128 * 4096 * 2
    assert a["mlp_inner"] == 2 * 128 * 11008 * 2
    assert a["attention_scores"] == 2 * 32 * 128 * 128 * 2
    assert a["logits"] == 2 * 128 * 32000 * 4
    assert a["peak_estimate_naive_attention"] >= a["peak_estimate_fused_attention"]
    # at long context the naive s*s score matrix outgrows the MLP working set
    a = activation_memory(LLAMA_7B, batch=1, seqlen=4096)
    assert a["layer_peak_naive_attention"] > a["layer_peak_fused_attention"]


@pytest.mark.parametrize("kw", [dict(batch=0, seqlen=1), dict(batch=1, seqlen=-3),
                                dict(batch=1.5, seqlen=2)])
def test_bad_sizes_raise(kw):
    with pytest.raises(LowbitError, match="batch|seqlen"):
        kv_cache_bytes(LLAMA_7B, **kw)


def test_bad_bits_raise():
    with pytest.raises(LowbitError, match="bits"):
        weight_memory(LLAMA_7B, 12)
