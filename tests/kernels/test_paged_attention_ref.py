"""Paged storage and reference paged attention against contiguous attention; the real model end to end."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lowbit.config import ModelConfig
from lowbit.engine import (
    BlockManager,
    PagedBatchCache,
    PagedKVCache,
    num_blocks_for_memory,
    paged_attention,
)
from lowbit.errors import LowbitError
from lowbit.layers.kv_quant import KVQuant


def _scatter(k_pool, v_pool, ks, vs, bs, g):
    """Write each sequence's k/v [n_kv, L, hd] into randomly chosen, non-contiguous blocks; return tables."""
    perm = torch.randperm(k_pool.shape[0], generator=g).tolist()
    tables = []
    for k, v in zip(ks, vs):
        n = -(-k.shape[1] // bs)
        table, perm = perm[:n], perm[n:]
        for i, b in enumerate(table):
            chunk = slice(i * bs, min((i + 1) * bs, k.shape[1]))
            w = chunk.stop - chunk.start
            k_pool[b, :, :w], v_pool[b, :, :w] = k[:, chunk], v[:, chunk]
        tables.append(table)
    return tables


@pytest.mark.parametrize("H,n_kv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("q_len", [1, 7])
def test_paged_attention_matches_sdpa(H, n_kv, q_len):
    g = torch.Generator().manual_seed(H * 10 + n_kv + q_len)
    hd, bs, num_blocks = 16, 4, 64
    lens = [13, 1 + q_len, 30, 9][: 1 + H % 4]                 # 2..4 sequences, lengths not multiples of bs
    lens = [max(L, q_len) for L in lens]
    B, rep = len(lens), H // n_kv
    k_pool = torch.randn(num_blocks, n_kv, bs, hd, generator=g)    # junk everywhere the tables don't point
    v_pool = torch.randn(num_blocks, n_kv, bs, hd, generator=g)
    ks = [torch.randn(n_kv, L, hd, generator=g) for L in lens]
    vs = [torch.randn(n_kv, L, hd, generator=g) for L in lens]
    tables = _scatter(k_pool, v_pool, ks, vs, bs, g)
    mb = max(map(len, tables))
    bt = torch.tensor([t + [-1] * (mb - len(t)) for t in tables])  # -1 padding must be harmless
    # Rows of different real query counts (chunked prefill); decode when q_len == 1.
    q_lens = torch.tensor([min(q_len, L) - (b % 2 if q_len > 1 else 0) for b, L in enumerate(lens)])
    q = torch.randn(B, H, q_len, hd, generator=g)
    out = paged_attention(q, k_pool, v_pool, bt, torch.tensor(lens), q_lens=q_lens)
    assert out.shape == (B, H, q_len, hd)
    for b, L in enumerate(lens):
        ql = int(q_lens[b])
        k = ks[b].repeat_interleave(rep, 0)[None]                     # [1, H, L, hd]
        v = vs[b].repeat_interleave(rep, 0)[None]
        q_pos = torch.arange(L - ql, L)[:, None]
        mask = torch.arange(L)[None] <= q_pos                         # [ql, L] causal, offset by the context
        ref = F.scaled_dot_product_attention(q[b:b + 1, :, :ql], k, v, attn_mask=mask)
        torch.testing.assert_close(out[b:b + 1, :, :ql], ref, atol=1e-5, rtol=1e-5)
        assert (out[b, :, ql:] == 0).all()                            # padded query rows


def _cfg(L=2, n_kv=2, hd=8):
    return ModelConfig(hidden_size=4 * hd, num_heads=4, num_kv_heads=n_kv, head_dim=hd, num_layers=L,
                       intermediate_size=8, vocab_size=16)


@pytest.mark.parametrize("kv_quant", [None, KVQuant("int8"), KVQuant("fp8")])
def test_paged_cache_write_gather_copy(kv_quant):
    g = torch.Generator().manual_seed(0)
    cfg = _cfg()
    kv = PagedKVCache(cfg, num_blocks=8, block_size=4, dtype=torch.float32, kv_quant=kv_quant)
    table, L = [5, 2, 7], 10
    slots = [table[p // 4] * 4 + p % 4 for p in range(L)]
    k = torch.randn(L, 2, 8, generator=g)                             # [N, n_kv, hd]
    v = torch.randn(L, 2, 8, generator=g)
    kv.write(1, slots, k, v)
    gk, gv = kv.gather(1, table, L)                                   # [n_kv, L, hd]
    rt = (lambda x: x) if kv_quant is None else kv_quant.roundtrip
    torch.testing.assert_close(gk, rt(k).transpose(0, 1))
    torch.testing.assert_close(gv, rt(v).transpose(0, 1))
    kv.copy_block(7, 0)                                               # copy-on-write of the last block
    gk2, _ = kv.gather(1, [5, 2, 0], L)
    torch.testing.assert_close(gk2, gk)
    assert kv.nbytes == (2 * 2 * 8 * 2 * 4 * 8 * (4 if kv_quant is None else 1)
                         + (0 if kv_quant is None else 2 * 2 * 8 * 2 * 4 * 4))
    with pytest.raises(LowbitError):
        kv.gather(1, [5], L)


def test_num_blocks_for_memory():
    cfg = _cfg()
    per_tok = 2 * 2 * 2 * 8 * 2                                       # K+V, layers, heads, hd, fp16 bytes
    assert num_blocks_for_memory(cfg, 10 * 16 * per_tok + 5, 16, torch.float16) == 10
    q = KVQuant("int8")
    assert num_blocks_for_memory(cfg, 16 * q.bytes_per_token(2, 2, 8) * 3, 16, kv_quant=q) == 3
    with pytest.raises(LowbitError, match="less than one block"):
        num_blocks_for_memory(cfg, 100, 16)


def test_real_model_paged_matches_contiguous(smollm2):
    """SmolLM2 through PagedBatchCache (scattered blocks, a prefix hit, chunked prefill, batched decode of
    two sequences of different lengths) gives the contiguous KVCache's logits."""
    model = smollm2[0]
    cfg, bs = model.config, 4
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, cfg.vocab_size, (20,), generator=g).tolist()
    b = a[:8] + torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist()   # shares 2 blocks with a
    bm = BlockManager(48, bs)
    rng = random.Random(0)
    for i in range(48):                  # fill the pool one block per filler, free a random 32 of them:
        bm.allocate(f"fill{i}", [rng.randrange(1000) for _ in range(rng.randrange(1, 5))])
    for i in rng.sample(range(48), 32):  # the free list is now a random order of scattered blocks
        bm.free(f"fill{i}")
    kv = PagedKVCache(cfg, 48, bs, torch.float32)
    assert bm.allocate("a", a) == 0 and bm.allocate("b", b) == 8      # b computes only its last 5 tokens
    tables = lambda: [bm.block_table("a"), bm.block_table("b")]
    assert any(y != x + 1 for x, y in zip(tables()[0], tables()[0][1:]))   # not contiguous

    ctx, q_lens = [20, 13], [20, 5]
    ids = torch.tensor([a, b[8:] + [0] * 15])
    step = PagedBatchCache(kv, tables(), ctx, q_lens)
    with torch.no_grad():
        paged = model(ids, step.q_pos, step)                          # [2, 20, V]
        refs, out = [], []
        for seq in (a, b):
            c = model.new_cache(1, 32)
            out.append(model(torch.tensor([seq]), cache=c)[0])
            refs.append(c)
        torch.testing.assert_close(paged[0], out[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(paged[1, :5], out[1][8:], atol=1e-4, rtol=0)
        nxt = [int(out[0][-1].argmax()), int(out[1][-1].argmax())]
        for _ in range(5):
            for s, t in zip("ab", nxt):
                app = bm.append_slot(s, t)
                assert app.copy is None                               # nothing shared is written
            ctx = [n + 1 for n in ctx]
            step = PagedBatchCache(kv, tables(), ctx, [1, 1])
            paged = model(torch.tensor([[t] for t in nxt]), step.q_pos, step)[:, 0]   # [2, V]
            ref = torch.cat([model(torch.tensor([[t]]), cache=c)[0] for t, c in zip(nxt, refs)])
            torch.testing.assert_close(paged, ref, atol=1e-4, rtol=0)
            nxt = ref.argmax(-1).tolist()
    bm.check_invariants()
