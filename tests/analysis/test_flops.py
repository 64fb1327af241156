"""FLOP formulas checked against torch's FlopCounterMode on a real HF Llama forward."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.analysis import decode_flops, generation_flops, prefill_flops
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError

TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=64)
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    # eager attention: QK^T and PV are aten.bmm calls the counter sees. (With "sdpa" on CPU,
    # torch 2.13's counter has no formula for the CPU fused attention op and counts 0 for it.)
    hf = LlamaConfig(vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
                     intermediate_size=TINY.intermediate_size, num_hidden_layers=TINY.num_layers,
                     num_attention_heads=TINY.num_heads, num_key_value_heads=TINY.num_kv_heads,
                     max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(hf).float().eval()


def counted(fn):
    """Run fn under FlopCounterMode -> (total, {op name: flops})."""
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        out = fn()
    by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return out, fc.get_total_flops(), by_op


def test_prefill_matches_flop_counter_exactly(tiny_model):
    b, s = 2, 7
    ids = torch.randint(0, TINY.vocab_size, (b, s))
    _, total, by_op = counted(lambda: tiny_model(ids, use_cache=True))
    f = prefill_flops(TINY, s, b)   # full s*s attention rectangle, logits for every position
    assert total == f.total
    # linears and lm_head are aten.mm; eager QK^T / PV are aten.bmm -> check the split too
    assert by_op["aten.mm"] == f.linear + f.lm_head
    assert by_op["aten.bmm"] == f.attention


def test_decode_step_with_kv_cache_matches_flop_counter_exactly(tiny_model):
    b, s = 2, 7
    ids = torch.randint(0, TINY.vocab_size, (b, s))
    with torch.no_grad():
        past = tiny_model(ids, use_cache=True).past_key_values
    nxt = torch.randint(0, TINY.vocab_size, (b, 1))
    _, total, by_op = counted(lambda: tiny_model(nxt, past_key_values=past, use_cache=True))
    f = decode_flops(TINY, context_len=s + 1, batch=b)   # new token attends to 7 cached + itself
    assert total == f.total
    assert by_op["aten.bmm"] == f.attention


def test_formulas_by_hand():
    d, L, V, f = 4096, 32, 32000, 11008
    per_tok = 2 * L * (4 * d * d + 3 * d * f)
    assert decode_flops(LLAMA_7B, 100).linear == per_tok
    assert decode_flops(LLAMA_7B, 100).attention == L * 2 * (2 * 32 * 100 * 128)
    assert prefill_flops(LLAMA_7B, 10).lm_head == 2 * 10 * d * V
    assert prefill_flops(LLAMA_7B, 10, all_logits=False).lm_head == 2 * d * V
    # causal counts s(s+1)/2 pairs instead of s^2
    assert prefill_flops(LLAMA_7B, 10, causal=True).attention * 100 == \
        prefill_flops(LLAMA_7B, 10).attention * 55
    # 2 FLOPs per parameter per token, except the embedding table (a gather, not a matmul)
    # and norms; plus attention over the single key
    non_embed = 6_738_415_616 - V * d - (2 * L + 1) * d
    assert decode_flops(LLAMA_7B, 1).total == 2 * non_embed + L * 4 * 32 * 128


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p,n,b", [(1, 1, 1), (5, 1, 2), (7, 9, 3), (16, 4, 1)])
def test_generation_closed_forms_equal_step_sums(p, n, b, causal):
    with_cache = prefill_flops(TINY, p, b, causal=causal, all_logits=False)
    for j in range(1, n):
        with_cache = with_cache + decode_flops(TINY, p + j, b)
    assert generation_flops(TINY, p, n, b, use_cache=True, causal=causal) == with_cache
    without = prefill_flops(TINY, p, b, causal=causal, all_logits=False)
    for j in range(1, n):
        without = without + prefill_flops(TINY, p + j, b, causal=causal, all_logits=False)
    assert generation_flops(TINY, p, n, b, use_cache=False, causal=causal) == without


def test_kv_cache_saves_most_flops_for_long_generation():
    w = generation_flops(LLAMA_7B, 512, 2048, use_cache=True).total
    wo = generation_flops(LLAMA_7B, 512, 2048, use_cache=False).total
    assert wo > 500 * w
    # one new token: both are the same single prefill
    assert generation_flops(LLAMA_7B, 512, 1, use_cache=True) == \
        generation_flops(LLAMA_7B, 512, 1, use_cache=False)


def test_bad_args_raise():
    with pytest.raises(LowbitError, match="context_len"):
        decode_flops(TINY, 0)
    with pytest.raises(LowbitError, match="new_tokens"):
        generation_flops(TINY, 4, 0)
