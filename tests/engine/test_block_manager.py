"""BlockManager: invariants under random streams, sharing, copy-on-write, prefix caching, a full pool."""
from __future__ import annotations

import random

import pytest

from lowbit.engine import BlockManager
from lowbit.errors import LowbitError


def test_allocate_append_free_basic():
    bm = BlockManager(8, block_size=4)
    assert bm.allocate("a", list(range(6))) == 0           # 6 tokens -> 2 blocks, nothing cached yet
    assert len(bm.block_table("a")) == 2 and bm.num_free_blocks == 6
    t = bm.block_table("a")
    assert bm.slot_mapping("a", [0, 3, 4, 5]) == [t[0] * 4, t[0] * 4 + 3, t[1] * 4, t[1] * 4 + 1]
    assert bm.append_slot("a", 6).slot == t[1] * 4 + 2        # fits in the last block
    bm.append_slot("a", 7)
    a = bm.append_slot("a", 8)                                 # block full: grow by one
    assert len(bm.block_table("a")) == 3 and a.copy is None and a.slot == bm.block_table("a")[2] * 4
    bm.check_invariants()
    st = bm.memory_stats()
    assert (st.slots_allocated, st.tokens_physical) == (12, 9) and st.waste == pytest.approx(0.25)
    bm.free("a")
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_fork_shares_and_frees_with_last_owner():
    bm = BlockManager(8, block_size=4)
    bm.allocate("p", list(range(10)))                          # 3 blocks, the last partly filled
    bm.fork("p", "c1")
    bm.fork("p", "c2")
    assert bm.num_free_blocks == 5
    assert all(bm.ref[b] == 3 for b in bm.block_table("p"))
    bm.check_invariants()
    st = bm.memory_stats()
    assert (st.tokens_physical, st.tokens_logical) == (10, 30)
    bm.free("p")
    bm.free("c1")
    assert bm.num_free_blocks == 5                             # c2 still owns them all
    bm.check_invariants()
    bm.free("c2")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_copy_on_write_gives_a_private_block():
    bm = BlockManager(8, block_size=4)
    bm.allocate("p", [1, 2, 3, 4, 5, 6])
    bm.fork("p", "c")
    shared_last = bm.block_table("p")[-1]
    a = bm.append_slot("c", 7)                                 # would write into the shared last block
    assert a.copy is not None and a.copy[0] == shared_last
    dst = a.copy[1]
    assert bm.block_table("c") == [bm.block_table("p")[0], dst] and dst != shared_last
    assert a.slot == dst * 4 + 2 and bm.ref[dst] == 1 and bm.ref[shared_last] == 1
    assert bm.append_slot("p", 9).copy is None                 # p now owns its last block alone
    assert bm.ref[bm.block_table("p")[0]] == 2                 # the full first block stays shared
    bm.check_invariants()


def test_fork_of_full_last_block_needs_no_copy():
    bm = BlockManager(8, block_size=4)
    bm.allocate("p", list(range(8)))
    bm.fork("p", "c")
    a = bm.append_slot("c", 8)
    assert a.copy is None and len(bm.block_table("c")) == 3 and bm.block_table("c")[:2] == bm.block_table("p")
    bm.check_invariants()


def test_prefix_cache_repeated_prompt_and_shared_system_prompt():
    bm = BlockManager(32, block_size=4)
    system = list(range(100, 112))                             # 3 full blocks
    assert bm.allocate("a", system + [1, 2, 3, 4, 5]) == 0
    # Same system prompt, different question: its 3 blocks are reused.
    assert bm.allocate("b", system + [9, 9]) == 12
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert bm.block_table("b")[3] != bm.block_table("a")[3]
    # The exact same 17-token prompt: 4 full blocks hit; the 5th (partial, the last token) is new.
    assert bm.allocate("c", system + [1, 2, 3, 4, 5]) == 16
    assert bm.block_table("c")[:4] == bm.block_table("a")[:4]
    bm.check_invariants()
    # Block-aligned full hit: the last token's block is recomputed (its logits are needed).
    assert bm.allocate("d", system) == 8
    # Same tokens at a different offset are a different prefix: no hit.
    assert bm.allocate("e", [0] + system) == 0
    bm.check_invariants()


def test_prefix_cache_survives_free_until_evicted():
    bm = BlockManager(6, block_size=4)
    prompt = list(range(9))                                    # 2 full blocks + 1
    bm.allocate("a", prompt)
    cached = bm.block_table("a")[:2]
    bm.free("a")
    assert bm.num_free_blocks == 6
    assert bm.allocate("b", prompt) == 8 and bm.block_table("b")[:2] == cached   # revived from the free list
    bm.check_invariants()
    bm.free("b")
    bm.allocate("big", list(range(1000, 1024)))                # takes all 6 blocks: evicts the cache
    bm.free("big")
    assert bm.allocate("c", prompt) == 0
    bm.check_invariants()


def test_decode_filled_blocks_become_cached():
    bm = BlockManager(16, block_size=4)
    bm.allocate("a", [1, 2, 3])
    for t in [4, 5, 6, 7, 8]:                                  # fills block 0 then block 1
        bm.append_slot("a", t)
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8
    bm.check_invariants()


def test_full_pool_raises_and_leaves_state_intact():
    bm = BlockManager(4, block_size=4)
    bm.allocate("a", list(range(12)))                          # 3 of 4 blocks
    assert bm.can_allocate(4) and not bm.can_allocate(5)
    with pytest.raises(LowbitError, match="KV cache full"):
        bm.allocate("b", list(range(50, 58)))
    assert "b" not in bm.seqs and bm.num_free_blocks == 1
    bm.check_invariants()
    bm.allocate("b", [7])
    assert not bm.can_append_slot("a")                         # a's last block is full, none free
    with pytest.raises(LowbitError, match="KV cache full"):
        bm.append_slot("a", 1)
    bm.check_invariants()
    with pytest.raises(LowbitError, match="empty prompt"):
        bm.allocate("z", [])


def test_random_stream_keeps_invariants():
    rng = random.Random(0)
    bm = BlockManager(64, block_size=4)
    # Prompts drawn from a few shared "system prompts" so prefix hits and evictions both happen.
    systems = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    next_id, hits, cows, forks = 0, 0, 0, 0
    for step in range(2000):
        live = list(bm.seqs)
        op = rng.random()
        if op < 0.3 or not live:
            prompt = rng.choice(systems)[:] + [rng.randrange(50) for _ in range(rng.randrange(1, 8))]
            if bm.can_allocate(len(prompt)):
                hits += bm.allocate(next_id, prompt) > 0
                next_id += 1
        elif op < 0.7:
            s = rng.choice(live)
            if bm.can_append_slot(s):
                cows += bm.append_slot(s, rng.choice([None, rng.randrange(50)])).copy is not None
        elif op < 0.8:
            if bm.num_free_blocks > 0:
                bm.fork(rng.choice(live), next_id)
                next_id += 1
                forks += 1
        else:
            bm.free(rng.choice(live))
        bm.check_invariants()
    assert hits > 20 and cows > 10 and forks > 20              # the stream exercised every path
    for s in list(bm.seqs):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 64


def test_hash_collision_is_not_a_hit(monkeypatch):
    import lowbit.engine.block_manager as bm_mod
    monkeypatch.setattr(bm_mod, "block_hash", lambda prev, toks: b"same")   # every block collides
    bm = BlockManager(16, block_size=4)
    bm.allocate("a", [1, 2, 3, 4, 5])
    assert bm.allocate("b", [9, 9, 9, 9, 5]) == 0              # tokens differ: verified, no false hit
    assert bm.allocate("c", [1, 2, 3, 4, 7]) == 4              # true hit still found
    bm.check_invariants()


def test_free_without_keeping_cache_drops_unwritten_blocks():
    bm = BlockManager(8, block_size=4)
    bm.allocate("a", list(range(9)))
    bm.free("a", keep_cached=False)                            # e.g. preempted before its prefill ran
    assert bm.allocate("b", list(range(9))) == 0
    bm.check_invariants()
