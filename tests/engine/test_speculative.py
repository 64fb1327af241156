"""Speculative decoding: the rejection rule preserves the target distribution; greedy == target greedy."""
import pytest
import torch

from lowbit.config import SamplingParams
from lowbit.engine.speculative import (SpecStats, accept_greedy, accept_or_resample, residual_distribution,
                                       speculative_generate)
from lowbit.errors import LowbitError
from lowbit.generate import encode_prompt, generate

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


def _rand_dist(g, V, sparse=False):
    p = torch.rand(V, generator=g, dtype=torch.float64) ** 3
    if sparse:
        p[torch.rand(V, generator=g) < 0.4] = 0       # top-k/top-p style zeros
        p[0] += 1e-3
    return p / p.sum()


def test_rule_preserves_target_distribution_exactly():
    """P(out = x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y q(y) min(1, p(y)/q(y))) * residual(x) == p(x)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        V = 2 + trial % 9
        p, q = _rand_dist(g, V, sparse=trial % 2 == 0), _rand_dist(g, V, sparse=trial % 3 == 0)
        acc = torch.where(q > 0, torch.minimum(torch.ones_like(p), p / q.clamp(min=1e-300)), torch.zeros_like(p))
        out = q * acc + (1 - (q * acc).sum()) * residual_distribution(p, q)
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)
    p = _rand_dist(g, 5)
    torch.testing.assert_close(residual_distribution(p, p), p)     # p == q: no residual mass, falls back to p


def test_rule_empirical_frequencies_match_target():
    """Draw x ~ q, run accept_or_resample with k = 1: the first emitted token's frequencies match p."""
    g = torch.Generator().manual_seed(1)
    V, N = 6, 20000
    p, q = _rand_dist(g, V).float(), _rand_dist(g, V).float()
    P, Q = torch.stack([p, p]), q[None]                              # p rows for position 1 and the bonus
    gen = torch.Generator().manual_seed(123)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).tolist()
    counts = torch.zeros(V)
    n_acc = 0
    for x in drafts:
        n, nxt = accept_or_resample(P, Q, [x], gen)
        first = x if n == 1 else nxt
        counts[first] += 1
        n_acc += n
    freq = counts / N
    assert (freq - p).abs().max() < 0.015, (freq, p)
    expected_acc = torch.minimum(p, q).sum()                        # P(accept) = sum min(p, q)
    assert abs(n_acc / N - float(expected_acc)) < 0.015


def test_accept_greedy():
    logits = torch.tensor([[0., 5, 1], [3, 0, 1], [0, 0, 9]])
    assert accept_greedy(logits, [1, 0]) == (2, 2)
    assert accept_greedy(logits, [1, 2]) == (1, 0)
    assert accept_greedy(logits, [0, 0]) == (0, 1)


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_equals_target_greedy(smollm2, smollm2_4, k):
    target, tok = smollm2
    draft, _ = smollm2_4
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ids = encode_prompt(tok, PROMPTS[0])
    ref, _ = generate(target, tok, [ids], params)
    out, st = speculative_generate(target, draft, tok, ids, params, k=k)
    assert out.token_ids == ref[0].token_ids
    assert out.text == ref[0].text and out.finish_reason == "length"
    assert st.new_tokens == 16
    if st.accepted:
        assert st.target_forwards < 16                              # fewer target forwards than tokens
    assert 0 < st.acceptance_rate <= 1 and st.accepted <= st.proposed


def test_draft_equals_target_accepts_everything(smollm2):
    """With the target as its own draft, greedy accepts every proposal: k + 1 tokens per target forward."""
    target, tok = smollm2
    ids = encode_prompt(tok, PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out, st = speculative_generate(target, target, tok, ids, params, k=4)
    ref, _ = generate(target, tok, [ids], params)
    assert out.token_ids == ref[0].token_ids
    assert st.acceptance_rate == 1.0 and st.target_forwards == 2    # 5 + 5 tokens


def test_seeded_sampling_reproducible(smollm2, smollm2_4):
    target, tok = smollm2
    draft, _ = smollm2_4
    ids = encode_prompt(tok, PROMPTS[1])
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=8, seed=7, ignore_eos=True)
    a, sa = speculative_generate(target, draft, tok, ids, params, k=3)
    b, sb = speculative_generate(target, draft, tok, ids, params, k=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert (sa.accepted, sa.proposed) == (sb.accepted, sb.proposed)
    c, _ = speculative_generate(target, draft, tok, ids,
                                SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=8, seed=8,
                                               ignore_eos=True), k=3)
    assert c.token_ids != a.token_ids


def test_sampled_self_draft_accepts_almost_everything(smollm2):
    """Sampling with the target as its own draft: p == q up to summation order, so ~every proposal is
    accepted. (The 4-block cut's filtered sampling distributions barely overlap the target's on these
    prompts: its sampled acceptance is ~0 while its greedy acceptance is > 0, see the greedy test.)"""
    target, tok = smollm2
    ids = encode_prompt(tok, PROMPTS[0])
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=3, ignore_eos=True)
    out, st = speculative_generate(target, target, tok, ids, params, k=3)
    assert len(out.token_ids) == 12 and st.acceptance_rate > 0.9


def test_stop_string_and_eos(smollm2, smollm2_4):
    target, tok = smollm2
    draft, _ = smollm2_4
    ids = encode_prompt(tok, PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref, _ = generate(target, tok, [ids], params)
    word = ref[0].text.split()[2]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[word])
    ref_s, _ = generate(target, tok, [ids], sp)
    out, _ = speculative_generate(target, draft, tok, ids, sp, k=4)
    assert out.finish_reason == ref_s[0].finish_reason == "stop"
    assert out.text == ref_s[0].text and out.token_ids == ref_s[0].token_ids
    # A one-token prompt and max_tokens smaller than k work too.
    out1, st1 = speculative_generate(target, draft, tok, ids[:1], SamplingParams(temperature=0, max_tokens=2), k=4)
    ref1, _ = generate(target, tok, [ids[:1]], SamplingParams(temperature=0, max_tokens=2))
    assert out1.token_ids == ref1[0].token_ids and out1.finish_reason == ref1[0].finish_reason
    assert isinstance(st1, SpecStats)


def test_bad_args(smollm2):
    target, tok = smollm2
    with pytest.raises(LowbitError):
        speculative_generate(target, target, tok, [], SamplingParams())
    with pytest.raises(LowbitError):
        speculative_generate(target, target, tok, [1, 2], SamplingParams(), k=0)
