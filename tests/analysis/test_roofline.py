"""Arithmetic intensity, roofline bounds, GPU table and the analyse/render report."""
import io
import json

import pytest
from rich.console import Console

from lowbit.analysis import (GPUS, analyse, decode_bound, get_gpu, op_costs, op_table,
                             prefill_bound, render, ridge_point, weight_memory)
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32)
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, rope_theta=500000.0)
SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, tie_word_embeddings=True)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def by_name(ops):
    return {o.name: o for o in ops}


def test_decode_linear_intensity_is_about_one_at_b1_fp16():
    ops = by_name(op_costs(LLAMA_7B, "decode", batch=1, seqlen=2048))
    for name in LINEARS:
        assert ops[name].intensity == pytest.approx(1.0, rel=0.01), name
    # and ~b for small batches (weights dominate the traffic)
    ops8 = by_name(op_costs(LLAMA_7B, "decode", batch=8, seqlen=2048))
    assert ops8["gate_proj"].intensity == pytest.approx(8.0, rel=0.02)


def test_decode_attention_intensity_is_gqa_group_size():
    # decode QK^T reads the whole K cache for 2*hd FLOPs per key per query head
    mha = by_name(op_costs(LLAMA_7B, "decode", 16, 4096))
    gqa = by_name(op_costs(LLAMA3_8B, "decode", 16, 4096))
    assert mha["qk^T"].intensity == pytest.approx(1.0, rel=0.01)
    # 32 query heads share 8 K/V heads -> ~4; writing the b*h*s scores costs h/(kv*hd) = 1/32
    # extra traffic relative to reading K, hence 4/(1 + 1/32 + ...) = 3.875
    assert gqa["qk^T"].intensity == pytest.approx(4.0, rel=0.04)


def test_prefill_linear_is_compute_bound_on_h100():
    h100 = get_gpu("h100")
    assert ridge_point("h100") == pytest.approx(989.4e12 / 3.35e12)   # ~295 FLOP/B
    rows = {r["name"]: r for r in op_table(LLAMA_7B, "prefill", 4, 2048, "h100")}
    assert rows["gate_proj"]["intensity"] > h100.ridge_point()
    assert rows["gate_proj"]["bound"] == "compute"
    dec = {r["name"]: r for r in op_table(LLAMA_7B, "decode", 1, 2048, "h100")}
    assert all(dec[n]["bound"] == "memory" for n in LINEARS)


def test_linear_cost_by_hand():
    op = by_name(op_costs(LLAMA_7B, "prefill", 2, 10))["up_proj"]
    m, i, o = 20, 4096, 11008
    assert op.flops == 2 * m * i * o
    assert op.bytes == 2 * (i * o + m * i + m * o)
    assert op.count == 32


def test_decode_bound_llama7b_h100():
    r = decode_bound(LLAMA_7B, "h100", batch=1, context_len=2048)
    w = weight_memory(LLAMA_7B, 16)["total_bytes"] - 32000 * 4096 * 2   # embedding is only gathered
    kv = 2 * 2048 * 32 * 4096 * 2
    assert r["bytes"] == w + kv and r["bound"] == "memory"
    assert r["tokens_per_s"] == pytest.approx(3.35e12 / (w + kv))        # ~240 tokens/s
    # batching amortises the weights: tokens/s grows ~linearly while memory-bound
    r64 = decode_bound(LLAMA_7B, "h100", batch=64, context_len=128)
    assert r64["tokens_per_s"] > 30 * decode_bound(LLAMA_7B, "h100", 1, 128)["tokens_per_s"]
    # int4 weights stream ~3.5x fewer bytes -> higher bound
    r4 = decode_bound(LLAMA_7B, "h100", 1, 2048, weight_bits=4)
    assert r4["tokens_per_s"] > 2.5 * r["tokens_per_s"]


def test_prefill_bound_is_compute_bound_for_long_prompts():
    r = prefill_bound(LLAMA_7B, "h100", batch=1, seqlen=4096)
    assert r["bound"] == "compute"
    assert r["time_s"] == pytest.approx(r["flops"] / 989.4e12)


def test_gpu_table():
    assert set(GPUS) >= {"h100", "h200", "a100", "l4", "cpu"}
    assert get_gpu("H100").mem_bandwidth == 3.35e12
    assert get_gpu("a100").fp8_flops is None
    with pytest.raises(LowbitError, match="h100"):   # message lists the known names
        get_gpu("nope")
    with pytest.raises(LowbitError, match="fp8"):
        get_gpu("a100").peak("fp8")


def test_bad_phase_raises():
    with pytest.raises(LowbitError, match="phase"):
        op_costs(LLAMA_7B, "train", 1, 1)


@pytest.mark.parametrize("cfg", [SMOLLM2_135M, LLAMA3_8B])
def test_analyse_report_is_json_and_renders(cfg):
    rep = analyse(cfg, batch=2, seqlen=512, gpu="h100", weight_bits=4)
    for k in ("params_total", "kv_cache_bytes", "kv_cache_bytes_per_token", "decode_tokens_per_s_bound",
              "params", "weight_memory", "kv", "activations", "flops", "intensity", "roofline"):
        assert k in rep, k
    assert rep["kv_cache_bytes"] == 2 * 512 * rep["kv_cache_bytes_per_token"]
    json.loads(json.dumps(rep))
    buf = io.StringIO()
    render(rep, Console(file=buf, width=160))
    text = buf.getvalue()
    assert "Parameters" in text and "Weight memory" in text and "Roofline" in text
    assert "GB" in text or "MB" in text


def test_analyse_bad_input():
    with pytest.raises(LowbitError, match="gpu"):
        analyse(SMOLLM2_135M, gpu="tpu")
    with pytest.raises(LowbitError, match="kv_bytes"):
        analyse(SMOLLM2_135M, kv_bytes=0)
    with pytest.raises(LowbitError, match="batch"):
        analyse(SMOLLM2_135M, batch=0)
