"""Continuous-batching scheduler over the paged KV cache.

Each `schedule()` builds one step's batch under two budgets, `max_num_seqs` running sequences and
`max_batched_tokens` new tokens:
  1. running sequences first, oldest first: a decode needs one new slot, a sequence still in chunked
     prefill takes its next chunk. When the pool has no block for one, the most recently arrived running
     sequence not yet scheduled this step is PREEMPTED (blocks freed, back to the front of the waiting
     queue with its generated tokens kept, recomputed on readmission); if there is none, the sequence
     preempts itself;
  2. then, if nothing was preempted this step, waiting requests are admitted FIFO while blocks, seats and
     tokens allow. A prompt longer than the tokens left is prefilled in chunks over several steps.

Block-manager bookkeeping is kept in step with the KV actually written: `allocate` / `append_slot` are
called for exactly the tokens computed this step, so a block is registered in the prefix cache in the
step that writes its KV (what `BlockManager.allocate` requires of its caller).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lowbit.engine.block_manager import BlockManager
from lowbit.engine.sequence import SeqStatus, Sequence
from lowbit.errors import LowbitError


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int              # first position computed this step (= tokens already in the cache)
    q_len: int              # tokens computed this step
    block_table: list[int]

    @property
    def context_len(self) -> int:
        return self.start + self.q_len

    @property
    def needs_sample(self) -> bool:
        """True when this step computes the sequence's last known token (prefill done, or a decode)."""
        return self.context_len == len(self.seq)

    @property
    def new_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start:self.context_len]


@dataclass
class Batch:
    items: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst) to do first
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)        # outgrew the whole pool ("length")

    @property
    def num_tokens(self) -> int:
        return sum(it.q_len for it in self.items)

    def __len__(self) -> int:
        return len(self.items)


class Scheduler:
    """Continuous batching under a token budget: running decodes first, then waiting prompts in chunks
    (chunked prefill) while blocks last; when the pool runs out the newest request is preempted and later
    recomputed. `schedule()` returns the next batch; finished and aborted requests release their blocks."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_batched_tokens: int = 2048):
        if max_num_seqs <= 0 or max_batched_tokens <= 0:
            raise LowbitError(f"scheduler: max_num_seqs ({max_num_seqs}) and max_batched_tokens "
                              f"({max_batched_tokens}) must be > 0")
        self.bm = block_manager
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0     # prompt tokens served from the prefix cache (not recomputed)

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        if self.bm.blocks_for(len(seq)) > self.bm.num_blocks:
            raise LowbitError(f"request {seq.request_id}: a {len(seq)}-token prompt needs "
                              f"{self.bm.blocks_for(len(seq))} KV blocks, the whole pool has {self.bm.num_blocks}")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id) -> Sequence | None:
        for s in (*self.running, *self.waiting):
            if s.request_id == request_id:
                return s
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give back its blocks (its computed full blocks stay in the prefix cache).
        Completions of an n > 1 request not yet forked off it finish with it only on abort or when the
        prompt outgrew the pool (they have no blocks of their own)."""
        if reason in ("abort", "length") and seq.children and not seq.output_ids:
            for c in seq.children:
                c.status, c.finish_reason = SeqStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id, keep_cached=True)  # every allocated token's KV is written by now
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def abort(self, request_id) -> list[Sequence]:
        """Finish every unfinished sequence of the request (all n completions); returns them."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        out = []
        for seq in seqs:
            out += [seq, *seq.children]
            self.finish(seq, "abort")
            seq.children = []
        return out

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """n > 1: after the parent's prompt prefill, the child shares its blocks and runs from there."""
        self.bm.fork(parent.seq_id, child.seq_id)
        child.num_computed, child.status = parent.num_computed, SeqStatus.RUNNING
        self.running.append(child)

    # ------------------------------------------------------------------ scheduling
    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        """Free blocks that extending a running sequence by n tokens takes (new blocks + a CoW copy)."""
        bm, sid = self.bm, seq.seq_id
        cur, table = bm.num_tokens(sid), bm.block_table(sid)
        cow = cur % bm.block_size != 0 and bm.ref[table[-1]] > 1
        return bm.blocks_for(cur + n) - len(table) + int(cow)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id, keep_cached=False)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Back in front, in arrival order among the preempted, so it is readmitted first.
        i = 0
        while i < len(self.waiting) and self.waiting[i].num_preemptions and self.waiting[i].order < seq.order:
            i += 1
        self.waiting.insert(i, seq)

    def schedule(self) -> Batch:
        batch, budget, scheduled = Batch(), self.max_batched_tokens, set()
        self.running.sort(key=lambda s: s.order)
        # 1. running sequences: decodes and continuing chunked prefills, oldest first.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:   # preempted as a victim earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while self._blocks_needed(seq, n) > self.bm.num_free_blocks:
                victims = [s for s in self.running if id(s) not in scheduled]
                victim = max(victims, key=lambda s: s.order)      # seq itself is among them
                if victim is seq and len(self.running) == 1:   # alone and still no room: it outgrew the pool
                    self.finish(seq, "length")
                    batch.finished.append(seq)
                    break
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:   # preempted itself, or finished
                continue
            start = seq.num_computed
            for tok in seq.token_ids[start:start + n]:
                app = self.bm.append_slot(seq.seq_id, tok)
                if app.copy is not None:
                    batch.copies.append(app.copy)
            batch.items.append(ScheduledSeq(seq, start, n, list(self.bm.block_table(seq.seq_id))))
            scheduled.add(id(seq))
            budget -= n
        # 2. admit waiting requests FIFO (not in a step that had to preempt: memory is tight).
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.running and len(self.running) + 1 + len(seq.children) > self.max_num_seqs:
                break                                 # its n completions will need n seats
            n = min(len(seq), budget)                 # a longer prompt is prefilled in chunks
            if not self.bm.can_allocate(n):
                break                                 # FIFO: nobody overtakes the head of the queue
            cached = self.bm.allocate(seq.seq_id, seq.token_ids[:n])
            self.waiting.popleft()
            self.num_cached_tokens += cached
            seq.status, seq.num_computed = SeqStatus.RUNNING, cached
            self.running.append(seq)
            batch.items.append(ScheduledSeq(seq, cached, n - cached,
                                            list(self.bm.block_table(seq.seq_id))))
            budget -= n - cached
        return batch

    def update(self, batch: Batch) -> None:
        """After the step ran: the scheduled tokens' KV is now in the cache."""
        for it in batch.items:
            it.seq.num_computed = it.context_len

