"""n > 1 completions per prompt: prefill once, fork the rest onto the prompt's blocks, copy-on-write."""
from __future__ import annotations

import pytest

from lowbit.config import SamplingParams
from lowbit.engine import LLM, Engine
from lowbit.errors import LowbitError

PROMPT = "Write a short poem about the sea. The waves"    # 11 tokens: a partly filled last block of 4


def _serve(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    final, peak = None, 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final = o
        engine.block_manager.check_invariants()
        peak = max(peak, engine.block_manager.memory_stats().blocks_used)
    assert final is not None and final.request_id == rid
    return final, peak


def test_n_validated():
    with pytest.raises(LowbitError, match="n:"):
        SamplingParams(n=0)
    assert SamplingParams().n == 1


def test_n_sampled_differ_reproducible_and_share_blocks(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT).input_ids
    assert len(ids) % 4 != 0
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=3, ignore_eos=True)
    engine = Engine(model, tok, num_blocks=64, block_size=4)
    out, peak_shared = _serve(engine, ids, params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    comps = [c.token_ids for c in out.outputs]
    assert all(len(c) == 8 for c in comps) and len({tuple(c) for c in comps}) == 3
    assert out.token_ids == comps[0] and out.text == out.outputs[0].text
    assert all(c.finish_reason == "length" and c.finished for c in out.outputs)
    assert engine.block_manager.num_free_blocks == 64 and not engine.block_manager.seqs
    again, _ = _serve(Engine(model, tok, num_blocks=64, block_size=4), ids, params)
    assert [c.token_ids for c in again.outputs] == comps                     # each one reproducible
    # Blocks: 3 independent requests (no prefix cache reuse possible: fresh engine each) vs one n=3 request.
    indep = sum(_serve(Engine(model, tok, num_blocks=64, block_size=4), ids,
                       SamplingParams(temperature=1.0, max_tokens=8, seed=s, ignore_eos=True))[1]
                for s in (1, 2, 3))
    full_prompt_blocks = len(ids) // 4
    assert peak_shared <= indep - 2 * full_prompt_blocks


def test_n_greedy_equals_single_and_llm_api(smollm2):
    llm = LLM(smollm2, num_blocks=48, block_size=4)
    single = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0]
    assert len(single.outputs) == 1 and single.outputs[0].token_ids == single.token_ids
    outs = llm.generate([PROMPT, "The capital of France is"],
                        [SamplingParams(temperature=0, max_tokens=8, n=2), SamplingParams(temperature=0, max_tokens=4)])
    assert len(outs) == 2 and len(outs[0].outputs) == 2 and len(outs[1].outputs) == 1
    assert all(c.token_ids == single.token_ids for c in outs[0].outputs)
    assert llm.engine.block_manager.num_free_blocks == 48


def test_n_under_preemption_and_abort(smollm2):
    model, tok = smollm2
    ids = tok(PROMPT).input_ids
    # tight pool: the 3 completions' growth forces preemption + recompute of forked sequences
    engine = Engine(model, tok, num_blocks=9, block_size=4)
    out, _ = _serve(engine, ids, SamplingParams(temperature=0, max_tokens=10, n=3, ignore_eos=True))
    ref = Engine(model, tok, num_blocks=64, block_size=4)
    single, _ = _serve(ref, ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert all(c.token_ids == single.token_ids for c in out.outputs)
    assert engine.block_manager.num_free_blocks == 9
    # abort while waiting (children never forked) and after the fork
    r = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=10, n=3))
    assert engine.abort(r) and not engine.has_unfinished()
    r = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=10, n=3))
    engine.step()
    engine.step()
    assert len(engine.scheduler.running) == 3
    assert engine.abort(r) and not engine.abort(r) and not engine.has_unfinished()
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == 9 and not engine.block_manager.seqs
