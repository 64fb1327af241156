"""KV-cache decoding and batched generation on the real SmolLM2."""
import pytest
import torch

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError
from lowbit.generate import encode_prompt, generate
from lowbit.models.kv_cache import KVCache

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):"]


def test_kv_cache_decode_equals_recompute(smollm2):
    """Greedy with the cache == greedy recomputing the whole sequence every step (no cache)."""
    model, tok = smollm2
    ids = encode_prompt(tok, PROMPTS[1])
    outs, _ = generate(model, tok, [ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert outs[0].token_ids == seq[len(ids):]


def test_cached_logits_equal_full_forward(smollm2, wiki_ids):
    """Prefill 40 tokens, then decode 8 one at a time: each step's logits equal the full forward's."""
    model, _ = smollm2
    ids = wiki_ids[:48][None]                                            # [1, 48]
    cache = KVCache(model.config, 1, 48, torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids)[0]                                             # [48, V]
        steps = [model(ids[:, :40], cache=cache)[0, -1]]
        steps += [model(ids[:, t:t + 1], cache=cache)[0, -1] for t in range(40, 47)]
    torch.testing.assert_close(torch.stack(steps), full[39:47], rtol=0, atol=2e-4)


def test_batched_greedy_equals_one_at_a_time(smollm2):
    model, tok = smollm2
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3                           # really different lengths
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched, _ = generate(model, tok, prompts, params)
    for p, b in zip(prompts, batched):
        alone, _ = generate(model, tok, [p], params)
        assert b.token_ids == alone[0].token_ids


def test_chat_template_answers(smollm2):
    model, tok = smollm2
    ids = encode_prompt(tok, "What is the capital of France?", chat=True)
    assert "<|im_start|>assistant" in tok.decode(ids)
    outs, stats = generate(model, tok, [ids], SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in outs[0].text
    assert outs[0].finish_reason == "eos" and stats.prefill_seconds > 0


def test_stop_strings_and_length(smollm2):
    model, tok = smollm2
    ids = encode_prompt(tok, "1, 2, 3, 4,")
    outs, _ = generate(model, tok, [ids], SamplingParams(temperature=0, max_tokens=30, stop=[" 7"]))
    assert outs[0].finish_reason == "stop" and " 7" not in outs[0].text and "6" in outs[0].text
    outs, _ = generate(model, tok, [ids], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 3


def test_sampling_seeded_reproducible(smollm2):
    model, tok = smollm2
    ids = encode_prompt(tok, PROMPTS[0])
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_tokens=10, seed=123, ignore_eos=True)
    a, _ = generate(model, tok, [ids], p)
    b, _ = generate(model, tok, [ids], p)
    c, _ = generate(model, tok, [ids], SamplingParams(**{**p.__dict__, "seed": 7}))
    assert a[0].token_ids == b[0].token_ids and a[0].token_ids != c[0].token_ids


def test_bad_requests(smollm2):
    model, tok = smollm2
    with pytest.raises(LowbitError, match="exceeds the model's context"):
        generate(model, tok, [[1] * 10], SamplingParams(max_tokens=model.config.max_position_embeddings))
    with pytest.raises(LowbitError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(LowbitError, match="stop"):
        SamplingParams(stop=[3])
