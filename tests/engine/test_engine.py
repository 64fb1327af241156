"""Engine / LLM on the real SmolLM2: continuous batching, chunked prefill, preemption + recompute, prefix
caching and abort all give, token for token, the greedy output of the request generated alone with the
contiguous cache (`lowbit.generate.generate`)."""
from __future__ import annotations

import pytest

from lowbit.config import SamplingParams
from lowbit.engine import LLM, Engine
from lowbit.errors import LowbitError
from lowbit.generate import generate

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "In computer science, a linked list is a linear collection of data elements whose order is",
    ("Once upon a time, in a small village at the edge of a great dark forest, there lived an old "
    "woodcutter and his three children, who"),
]
SYSTEM = ("You are a helpful assistant. Answer briefly and precisely, and never make anything up. "
          "Question: ")
GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def ref(smollm2):
    """Greedy output of one token-id prompt generated alone (contiguous cache), memoized."""
    model, tok = smollm2
    memo = {}

    def get(ids, params=GREEDY):
        key = (tuple(ids), params.max_tokens)
        if key not in memo:
            memo[key] = generate(model, tok, [list(ids)], params)[0][0].token_ids
        return memo[key]
    return get


def _drain(engine, outs):
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        engine.block_manager.check_invariants()


def test_continuous_batching_preemption_chunked_prefill(smollm2, ref):
    model, tok = smollm2
    ids = [tok(p).input_ids for p in PROMPTS]
    # 4-token blocks, 14 of them (~56 slots for ~95 tokens of prompts + outputs): preemption must happen;
    # a 12-token budget chunks the long prompts.
    engine = Engine(model, tok, num_blocks=14, block_size=4, max_batched_tokens=12)
    arrive = {0: [0, 1], 2: [2], 4: [3]}       # step -> prompts added before it
    rid, outs, step = {}, {}, 0
    while step <= max(arrive) or engine.has_unfinished():
        for i in arrive.get(step, []):
            rid[engine.add_request(ids[i], GREEDY)] = i
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        engine.block_manager.check_invariants()
        step += 1
    assert engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in outs.values()) > 0
    for r, i in rid.items():
        assert outs[r].token_ids == ref(ids[i]), PROMPTS[i]
        assert outs[r].finish_reason in ("length", "eos")
        assert outs[r].text == tok.decode(outs[r].token_ids, skip_special_tokens=True)
        assert outs[r].ttft is not None and 0 <= outs[r].ttft <= outs[r].total_time
    assert engine.block_manager.num_free_blocks == 14 and not engine.block_manager.seqs


def test_tiny_pool_forces_recompute(smollm2, ref):
    model, tok = smollm2
    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    engine = Engine(model, tok, num_blocks=8, block_size=4)     # 32 slots for 3 sequences of ~15-30
    rids = [engine.add_request(x, GREEDY) for x in ids]
    outs = {}
    _drain(engine, outs)
    assert engine.scheduler.num_preemptions > 0
    for r, x in zip(rids, ids):
        assert outs[r].token_ids == ref(x)


def test_prefix_cache_hits_match_misses(smollm2, ref):
    model, tok = smollm2
    ids = [tok(SYSTEM + q).input_ids for q in ("What is 2+2?", "Name a colour.", "Who wrote Hamlet?")]
    engine = Engine(model, tok, num_blocks=64, block_size=4)
    outs = {}
    r0 = engine.add_request(ids[0], GREEDY)
    _drain(engine, outs)                                         # the system prompt's blocks are now cached
    assert engine.scheduler.num_cached_tokens == 0
    r1, r2 = engine.add_request(ids[1], GREEDY), engine.add_request(ids[2], GREEDY)
    _drain(engine, outs)
    assert engine.scheduler.num_cached_tokens >= 2 * 16          # both later requests hit the shared prefix
    for r, x in zip((r0, r1, r2), ids):
        assert outs[r].token_ids == ref(x)
    assert engine.block_manager.num_free_blocks == 64


def test_abort_frees_and_others_continue(smollm2, ref):
    model, tok = smollm2
    ids = [tok(p).input_ids for p in PROMPTS[:3]]
    engine = Engine(model, tok, num_blocks=40, block_size=4)
    rids = [engine.add_request(x, GREEDY) for x in ids]
    waiting = engine.add_request(ids[0], GREEDY)
    assert engine.abort(waiting)                                 # aborted while still waiting
    outs = {}
    for _ in range(3):
        engine.step()
    used = engine.block_manager.num_free_blocks
    assert engine.abort(rids[1]) and not engine.abort(rids[1])
    assert engine.block_manager.num_free_blocks > used          # its blocks came back at once
    engine.block_manager.check_invariants()
    _drain(engine, outs)
    assert rids[1] not in outs
    for r in (rids[0], rids[2]):
        assert outs[r].token_ids == ref(ids[rids.index(r)])
    assert engine.block_manager.num_free_blocks == 40 and not engine.block_manager.seqs
    assert not engine.abort(12345)


def test_bad_requests_rejected_engine_keeps_serving(smollm2, ref):
    model, tok = smollm2
    ctx = model.config.max_position_embeddings
    engine = Engine(model, tok, num_blocks=16, block_size=4)
    ok = tok(PROMPTS[0]).input_ids
    good = engine.add_request(ok, GREEDY)
    engine.step()
    with pytest.raises(LowbitError, match="exceeds the context"):
        engine.add_request([1] * (ctx + 1), GREEDY)
    with pytest.raises(LowbitError, match="whole pool"):
        engine.add_request([1] * 100, GREEDY)                    # 25 blocks > 16
    with pytest.raises(LowbitError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    bad = SamplingParams(temperature=0, max_tokens=4)
    bad.max_tokens = -1
    with pytest.raises(LowbitError, match="max_tokens"):
        engine.add_request(ok, bad)
    with pytest.raises(LowbitError, match="no tokens"):
        engine.add_request([], GREEDY)
    with pytest.raises(LowbitError, match="token ids"):
        engine.add_request([model.config.vocab_size], GREEDY)
    outs = {}
    _drain(engine, outs)
    assert list(outs) == [good] and outs[good].token_ids == ref(ok)


def test_llm_generate_mixed_params_and_stop(smollm2, ref):
    model, tok = smollm2
    llm = LLM(smollm2, num_blocks=48, block_size=4)
    stop_ref = generate(model, tok, [tok(PROMPTS[2]).input_ids],
                        SamplingParams(temperature=0, max_tokens=12, stop=["data type"]))[0][0]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=12, stop=["data type"]),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, seed=1)]
    outs = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], params)
    assert outs[0].token_ids == ref(tok(PROMPTS[0]).input_ids)
    assert (outs[1].token_ids, outs[1].text, outs[1].finish_reason) == (
        stop_ref.token_ids, stop_ref.text, stop_ref.finish_reason)
    assert outs[1].finish_reason == "stop" and 1 <= len(outs[2].token_ids) <= 6
    again = llm.generate(PROMPTS[1], params[2])[0]               # per-request seeded generator
    assert again.token_ids == outs[2].token_ids
    with pytest.raises(LowbitError, match="sampling params"):
        llm.generate(PROMPTS[:2], [GREEDY])
