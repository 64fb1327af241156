"""The official `openai` client against a real `lowbit serve`: completions and chat, streamed and not; greedy
outputs equal `LLM.generate` of the same prompts in this process; logprobs equal the model's own."""
from __future__ import annotations

import pytest
import torch

from live_server import NAME
from lowbit.config import SamplingParams
from lowbit.engine import LLM
from lowbit.generate import encode_chat

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_TOK = 20


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, num_blocks=128, block_size=16)


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy outputs of the same prompts through LLM.generate, in this process."""
    return llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=N_TOK))


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].object == "model" and models[0].owned_by == "lowbit"


def test_completions_greedy_equal_llm_generate(client, reference):
    for prompt, ref in zip(PROMPTS, reference):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=N_TOK, temperature=0)
        assert r.object == "text_completion" and len(r.choices) == 1
        c = r.choices[0]
        assert c.text == ref.text
        assert c.finish_reason == ("length" if ref.finish_reason == "length" else "stop")
        assert r.usage.prompt_tokens == len(ref.prompt_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_batch_of_prompts_and_token_ids(client, reference):
    """A list of prompts is one choice per prompt, in order; token-id prompts give the same text."""
    r = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=N_TOK, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [ref.text for ref in reference]
    r = client.completions.create(model=NAME, prompt=reference[1].prompt_ids, max_tokens=N_TOK, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].text == reference[1].text
    assert r.choices[0].model_extra["token_ids"] == reference[1].token_ids


def test_completions_streamed_equal_non_streamed(client, reference):
    for prompt, ref in zip(PROMPTS, reference):
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=N_TOK, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == ref.text
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(finals) == 1
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_greedy_equal_llm_generate(client, llm, smollm2):
    _, tok = smollm2
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three primary colors."}]
    ref = llm.generate(encode_chat(tok, messages), SamplingParams(temperature=0, max_tokens=N_TOK))[0]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N_TOK, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_ids)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N_TOK, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_streamed_and_not(client, llm):
    """Text ends before the stop string, finish_reason stop; the stream holds back what could be its start."""
    prompt, stop = "1, 2, 3, 4, 5,", [" 8", "nine"]
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=stop))[0]
    assert ref.finish_reason == "stop"          # the continuation counts past 8 (else the test proves nothing)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == ref.text and " 8" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == ref.text


def test_sampling_seed_n_top_k_top_p(client):
    """n choices; the same seed gives the same choices, another seed other ones."""
    def sample(seed):
        r = client.completions.create(model=NAME, prompt="My favourite food is", max_tokens=12, temperature=1.0,
                                      top_p=0.95, n=3, seed=seed, extra_body={"top_k": 50})
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        return [ch.text for ch in r.choices]
    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    assert len(set(a)) > 1                   # the n completions differ from each other


def test_logprobs_equal_the_models(client, smollm2):
    """Each returned logprob and top-k equals log_softmax of the model's own logits over prompt + output."""
    model, tok = smollm2
    prompt = "The quick brown fox"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True})
    ch = r.choices[0]
    out_ids = ch.model_extra["token_ids"]
    ids = tok(prompt).input_ids + out_ids
    with torch.inference_mode():
        lp = model(torch.tensor([ids])).double().log_softmax(-1)[0]                # [T, V]
    P = len(ids) - len(out_ids)
    lp = lp[P - 1:-1]                                                               # rows predicting each output
    assert ch.logprobs.tokens == [tok.decode([t]) for t in out_ids]
    for i, t in enumerate(out_ids):
        assert ch.logprobs.token_logprobs[i] == pytest.approx(lp[i, t].item(), abs=2e-3)
        top = lp[i].topk(3)
        want = {tok.decode([j]): v for j, v in zip(top.indices.tolist(), top.values.tolist())}
        got = ch.logprobs.top_logprobs[i]
        assert set(got) == set(want)
        assert all(got[k] == pytest.approx(want[k], abs=2e-3) for k in want)
    assert ch.logprobs.text_offset[0] == 0
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)      # greedy: the best token
