"""Block manager of the paged KV cache (PagedAttention, Kwon et al. 2023).

The KV pool is cut into `num_blocks` physical blocks of `block_size` token slots. Each sequence owns a
*block table* (logical block i -> physical block id), so its KV need not be contiguous and memory is
allocated a block at a time instead of `max_len` up front. This module does the bookkeeping only (pure
Python, no tensors); `PagedKVCache` holds the tensors those ids index.

Sharing, three ways, all through per-block reference counts:
  * prefix caching: a FULL block is registered under a hash of its tokens chained with the previous
    block's hash, so an equal hash means an equal whole prefix (tokens are compared too on a hit); a new
    prompt starting with a cached prefix reuses those blocks instead of recomputing their KV;
  * fork: n > 1 samples of one prompt share its blocks (refcounts up);
  * copy-on-write: a shared block about to be written (the partly filled last block after a fork) is first
    copied into a private block; `append_slot` reports the (src, dst) copy for the cache to perform.

Eviction: a block whose last owner is freed goes to the TAIL of the free list but keeps its hash, so a
later prompt can still hit it (a hit takes it back out of the free list). Allocation pops from the HEAD,
so never-used blocks go first, then cached blocks in least-recently-freed order (LRU). A sequence frees
its blocks last-to-first, so its tail blocks are evicted before its more shareable prefix blocks.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from lowbit.errors import LowbitError

_NO_HASH = b""  # the "previous hash" of a sequence's first block


def block_hash(prev: bytes, tokens: Sequence[int]) -> bytes:
    """128-bit content hash of one full block chained with its predecessor's hash (so: of the prefix)."""
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class Append(NamedTuple):
    slot: int                           # flat slot (block * block_size + offset) for the new token's KV
    copy: tuple[int, int] | None        # copy-on-write to do BEFORE writing: copy block src into dst


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)          # logical block -> physical block
    tokens: list[int | None] = field(default_factory=list)  # None: token id unknown (no hashing after it)


@dataclass
class MemoryStats:
    blocks_used: int        # distinct physical blocks owned by some sequence
    slots_allocated: int    # blocks_used * block_size
    tokens_physical: int    # filled slots in those blocks (a shared block counts once)
    tokens_logical: int     # sum of sequence lengths (a shared block counts once per owner)

    @property
    def waste(self) -> float:
        """Fraction of allocated slots holding no token (internal fragmentation: < 1 block per sequence)."""
        return 1 - self.tokens_physical / self.slots_allocated if self.slots_allocated else 0.0


class BlockManager:
    """Free list, refcounts, block tables and a prefix cache over `num_blocks` blocks of `block_size`."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise LowbitError(f"block manager: num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        # An ordered set: allocation pops the oldest entry, a prefix hit removes one from anywhere in O(1).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash: list[bytes | None] = [None] * num_blocks         # hash of a full, registered block
        self._prev: list[bytes | None] = [None] * num_blocks         # its predecessor's hash (verified on hit)
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}                          # hash -> block (owned or free)
        self.seqs: dict[object, _Seq] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_allocate(self, n_tokens: int) -> bool:
        """Whether a prompt of n_tokens fits even with no prefix hit (conservative, as a scheduler wants)."""
        return self.blocks_for(n_tokens) <= len(self._free)

    def can_append_slot(self, seq_id) -> bool:
        """Whether append_slot needs no block or one is free (it needs one for a new block or a CoW)."""
        return not self._needs_block(self.seqs[seq_id]) or len(self._free) > 0

    def block_table(self, seq_id) -> list[int]:
        return self.seqs[seq_id].table

    def num_tokens(self, seq_id) -> int:
        return len(self.seqs[seq_id].tokens)

    def slot_mapping(self, seq_id, positions: Iterable[int]) -> list[int]:
        """Token positions of a sequence -> flat slot indices (block * block_size + offset)."""
        table, bs = self.seqs[seq_id].table, self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    # ------------------------------------------------------------------ mutations
    def allocate(self, seq_id, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for its prompt; return how many leading tokens are already cached.

        The cached count is a multiple of block_size and below len(token_ids): the last prompt token is
        always computed (its logits are needed), so a block-aligned full hit still recomputes one block.
        Every full prompt block is registered in the prefix cache now: the engine must write its KV in the
        same step as (or before) any sequence that hits it reads it (true when each layer writes all new
        KV before attending).
        """
        if seq_id in self.seqs:
            raise LowbitError(f"block manager: sequence {seq_id!r} already has blocks")
        if len(token_ids) == 0:
            raise LowbitError(f"block manager: sequence {seq_id!r} has an empty prompt")
        bs, n = self.block_size, len(token_ids)
        n_blocks = self.blocks_for(n)
        # Match the cached prefix first, mutating nothing, so a failure leaves the manager as it was.
        hits, hashes, prev = [], [], _NO_HASH
        for i in range(n // bs):  # full blocks only
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = block_hash(prev, toks)
            hashes.append(h)
            if len(hits) == i and i < (n - 1) // bs:  # still on the hit chain, and not the last token's block
                b = self._cached.get(h)
                if b is not None and self._tokens[b] == toks and self._prev[b] == prev:
                    hits.append(b)
            prev = h
        live_hits = sum(self.ref[b] > 0 for b in hits)  # free-list hits consume a free block too
        if n_blocks - live_hits > len(self._free):
            raise LowbitError(
                f"KV cache full: a {n}-token prompt needs {n_blocks - live_hits} free blocks of {bs} tokens, "
                f"{len(self._free)} of {self.num_blocks} are free")
        seq = self.seqs[seq_id] = _Seq(tokens=list(token_ids))
        for b in hits:
            self._take(b)
            seq.table.append(b)
        for i in range(len(hits), n_blocks):
            b = self._pop_free()
            seq.table.append(b)
            if i < len(hashes):
                self._register(b, hashes[i], hashes[i - 1] if i else _NO_HASH, token_ids[i * bs:(i + 1) * bs])
        return len(hits) * bs

    def append_slot(self, seq_id, token_id: int | None = None) -> Append:
        """Reserve the slot of the sequence's next token (token_id, if known, lets its block be cached).

        Grows the table by a block when the last one is full; copies-on-write when the last block is
        shared and the new token would be written into it.
        """
        seq, bs = self.seqs[seq_id], self.block_size
        if self._needs_block(seq) and not self._free:
            raise LowbitError(f"KV cache full: no free block for sequence {seq_id!r}'s next token")
        pos, copy = len(seq.tokens), None
        if pos % bs == 0:                     # last block full (or none): start a new one
            seq.table.append(self._pop_free())
        elif self.ref[seq.table[-1]] > 1:     # shared, partly filled: make a private copy to write into
            src, dst = seq.table[-1], self._pop_free()
            self.ref[src] -= 1                # others still own src (refcount was > 1)
            seq.table[-1] = dst
            copy = (src, dst)
        seq.tokens.append(token_id)
        if (pos + 1) % bs == 0:               # this token fills its block: register it for prefix hits
            self._register_full(seq, pos // bs)
        return Append(seq.table[-1] * bs + pos % bs, copy)

    def fork(self, parent, child) -> None:
        """The child shares all of the parent's blocks (n > 1 samples of one prompt)."""
        if child in self.seqs:
            raise LowbitError(f"block manager: sequence {child!r} already has blocks")
        p = self.seqs[parent]
        for b in p.table:
            self.ref[b] += 1
        self.seqs[child] = _Seq(table=list(p.table), tokens=list(p.tokens))

    def free(self, seq_id, keep_cached: bool = True) -> None:
        """Drop a sequence; a block returns to the free list with its last owner (hash kept: see module doc).

        Pass keep_cached=False when the sequence's KV was never (fully) written, e.g. preempted or aborted
        before its prefill ran: its unowned blocks then leave the prefix cache, so no later prompt hits
        slots holding garbage.
        """
        seq = self.seqs.pop(seq_id)
        for b in reversed(seq.table):  # tail first, so the tail is evicted before the shareable prefix
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self._free[b] = None
                if not keep_cached:
                    self._unregister(b)

    # ------------------------------------------------------------------ internals
    def _needs_block(self, seq: _Seq) -> bool:
        n = len(seq.tokens)
        return n % self.block_size == 0 or self.ref[seq.table[-1]] > 1

    def _take(self, b: int) -> None:
        """Own one more reference to a cached block (reviving it from the free list if unowned)."""
        if self.ref[b] == 0:
            del self._free[b]
        self.ref[b] += 1

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        self._unregister(b)  # evict: its old content is about to be overwritten
        self.ref[b] = 1
        return b

    def _unregister(self, b: int) -> None:
        if self._hash[b] is not None:
            if self._cached.get(self._hash[b]) == b:
                del self._cached[self._hash[b]]
            self._hash[b] = self._prev[b] = self._tokens[b] = None

    def _register(self, b: int, h: bytes, prev: bytes, tokens: Sequence[int]) -> None:
        self._hash[b], self._prev[b], self._tokens[b] = h, prev, tuple(tokens)
        self._cached.setdefault(h, b)  # an existing block with the same content stays the one found

    def _register_full(self, seq: _Seq, i: int) -> None:
        """Hash block i of seq once full, if every token up to it is known."""
        bs = self.block_size
        toks = seq.tokens[i * bs:(i + 1) * bs]
        b = seq.table[i]
        if None in toks or self._hash[b] is not None:
            return
        prev = _NO_HASH if i == 0 else self._hash[seq.table[i - 1]]
        if prev is None:  # predecessor not hashed (unknown tokens): the chain is broken
            return
        self._register(b, block_hash(prev, toks), prev, toks)

    # ------------------------------------------------------------------ checks and metrics
    def memory_stats(self) -> MemoryStats:
        fill: dict[int, int] = {}  # block -> filled slots (max over owners: sharers agree on a prefix)
        for s in self.seqs.values():
            n = len(s.tokens)
            for i, b in enumerate(s.table):
                fill[b] = max(fill.get(b, 0), min(self.block_size, n - i * self.block_size))
        return MemoryStats(len(fill), len(fill) * self.block_size, sum(fill.values()),
                           sum(len(s.tokens) for s in self.seqs.values()))

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call this after every op)."""
        def fail(msg):
            raise AssertionError(f"block manager invariant: {msg}")
        owners = [0] * self.num_blocks
        for sid, s in self.seqs.items():
            if len(s.table) != self.blocks_for(len(s.tokens)):
                fail(f"seq {sid!r}: {len(s.table)} blocks for {len(s.tokens)} tokens")
            if len(set(s.table)) != len(s.table):
                fail(f"seq {sid!r} holds a block twice: {s.table}")
            for b in s.table:
                owners[b] += 1
        for b in range(self.num_blocks):
            if self.ref[b] != owners[b]:
                fail(f"block {b}: refcount {self.ref[b]} but {owners[b]} tables hold it")
            if (b in self._free) != (owners[b] == 0):
                fail(f"block {b}: {'free' if b in self._free else 'not free'} with {owners[b]} owners")
        for h, b in self._cached.items():
            if self._hash[b] != h:
                fail(f"prefix cache maps a hash to block {b}, which holds another")
        for s in self.seqs.values():  # a registered block's tokens are what its owners hold there
            for i, b in enumerate(s.table):
                if self._tokens[b] is not None and list(self._tokens[b]) != s.tokens[i * self.block_size:
                                                                                    (i + 1) * self.block_size]:
                    fail(f"block {b}: cached tokens differ from an owner's")
