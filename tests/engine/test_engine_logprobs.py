"""SamplingParams.logprobs: each generated token's log-probability and the top-k alternatives, checked against
log_softmax (float64) of the model's own logits over prompt + output, run without the paged cache."""
from __future__ import annotations

import pytest
import torch

from lowbit.config import SamplingParams
from lowbit.engine import LLM, TokenLogprob
from lowbit.errors import LowbitError


def _reference(model, ids: list[int], n_out: int) -> torch.Tensor:
    """[n_out, V] float64 log-probabilities of the positions that predicted the last n_out ids."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].double()                  # [T, V]
    return logits.log_softmax(-1)[len(ids) - n_out - 1:-1]


def test_greedy_logprobs_equal_the_models(smollm2):
    model, tok = smollm2
    llm = LLM(smollm2, num_blocks=64, block_size=16)
    prompts = ["The capital of Italy is", "Water boils at"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=5))
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) > 0
        ref = _reference(model, tok(prompt).input_ids + c.token_ids, len(c.token_ids))
        for i, (t, e) in enumerate(zip(c.token_ids, c.logprobs)):
            assert isinstance(e, TokenLogprob) and e.token_id == t
            assert e.logprob == pytest.approx(ref[i, t].item(), abs=1e-3)
            top = ref[i].topk(5)
            assert [j for j, _ in e.top] == top.indices.tolist()
            assert [v for _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-3)
            assert e.top[0][0] == t                                        # greedy takes the best token


def test_sampled_n_completions_have_their_own_logprobs(smollm2):
    model, tok = smollm2
    llm = LLM(smollm2, num_blocks=64, block_size=16)
    prompt = "My favourite animal is"
    out = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=3, logprobs=0))[0]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) and all(e.top == [] for e in c.logprobs)
        ref = _reference(model, tok(prompt).input_ids + c.token_ids, len(c.token_ids))
        got = torch.tensor([e.logprob for e in c.logprobs], dtype=torch.float64)
        want = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(got, want, atol=1e-3)


def test_logprobs_off_by_default_and_validated(smollm2):
    out = LLM(smollm2, num_blocks=16, block_size=16).generate("Hi", SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.outputs[0].logprobs is None
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(LowbitError, match="logprobs"):
            SamplingParams(logprobs=bad)
