"""The decode step on the GPU: paged-attention kernel, static buffers, one CUDA graph per batch size.

A decode step of a small model is a few hundred tiny kernels; launched one by one from Python they
take longer than the math. Captured once into a CUDA graph per batch size (1, 2, 4, 8, ... up to
max_num_seqs), a step is one replay. Everything a step reads that changes between steps lives in
static tensors filled before the replay: token ids, positions, KV slots, block tables (padded to the
model's context) and context lengths. Batches are padded up to the next captured size; padded rows
read and write a scratch block that the block manager never hands out, so they touch no real KV.
"""
from __future__ import annotations

import torch

from lowbit.engine.paged_cache import PagedKVCache
from lowbit.kernels.paged_attention import decode_attention

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class PagedDecodeCache:
    """Model-facing cache of a decode step (one new token per sequence) over static buffers.

    The decoder sees `fused_attention` and calls `attention`, which stores the new K/V in their slots
    and runs the paged decode-attention kernel (its PyTorch reference off the GPU).
    """

    fused_attention = True
    pad = None
    pos = 0

    def __init__(self, kv: PagedKVCache, slots, block_tables, context_lens, num_splits: int | None = None):
        self.kv, self.block_tables, self.context_lens = kv, block_tables, context_lens
        self.slots = kv._slots(slots)          # (block, offset) once per step, not once per layer
        self.num_splits = num_splits
        self.scale = kv.cfg.head_dim ** -0.5

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, H, 1, hd], k/v [B, n_kv, 1, hd] -> attention output [B, H, 1, hd]."""
        kv = self.kv
        kv.write(layer, self.slots, k[:, :, 0], v[:, :, 0])                  # [B, n_kv, hd] into slots
        quant = kv.kv_quant is not None
        o = decode_attention(q[:, :, 0], kv.k[layer], kv.v[layer], self.block_tables, self.context_lens,
                             scale=self.scale, k_scale=kv.k_scale[layer] if quant else None,
                             v_scale=kv.v_scale[layer] if quant else None, num_splits=self.num_splits)
        return o[:, :, None]                                                 # [B, H, 1, hd]

    def attn_mask(self, T: int):
        return None

    def advance(self, T: int) -> None:
        pass


class DecodeRunner:
    """Runs pure-decode batches through PagedDecodeCache, replaying CUDA graphs when `use_graphs`.

    The pool must have one block more than the block manager manages: the last one is the scratch
    block of padded rows.
    """

    def __init__(self, model, kv: PagedKVCache, max_batch: int, use_graphs: bool = True,
                 batch_sizes=GRAPH_BATCH_SIZES):
        self.model, self.kv = model, kv
        dev, bs = kv.device, kv.block_size
        self.scratch = kv.num_blocks - 1
        self.max_blocks = -(-model.config.max_position_embeddings // bs)
        sizes = sorted({b for b in batch_sizes if b < max_batch} | {max_batch})
        self.sizes, self.max_batch = sizes, sizes[-1]
        B, MB = self.max_batch, self.max_blocks
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), self.scratch * bs, dtype=torch.long, device=dev)
        self.block_tables = torch.full((B, MB), self.scratch, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=dev)
        # Split-K over the sequence is chosen for the longest context, once: a graph cannot re-plan.
        self.num_splits = None if not use_graphs else max(1, min(16, MB // 32))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if use_graphs:
            self._capture()

    def _forward(self, n: int) -> torch.Tensor:
        """Logits [n, V] (float32) of the first n static rows."""
        m = self.model
        step = PagedDecodeCache(self.kv, self.slots[:n], self.block_tables[:n], self.context_lens[:n],
                                self.num_splits)
        x, cos, sin, _ = m.embed(self.ids[:n], self.positions[:n], step)
        for layer in m.model.layers:
            x = layer(x, cos, sin, step, None)
        return m.head(x[:, 0]).float()

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):           # warm-up compiles the Triton kernels outside capture
            for n in self.sizes:
                self._forward(n)
        torch.cuda.current_stream().wait_stream(side)
        for n in reversed(self.sizes):          # largest first, so smaller graphs reuse its memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[n] = self._forward(n)
            pool = g.pool()
            self.graphs[n] = g

    @torch.inference_mode()
    def logits(self, items) -> torch.Tensor:
        """items: ScheduledSeq with q_len == 1 -> last-token logits [len(items), V]."""
        n, bs, scratch = len(items), self.kv.block_size, self.scratch
        size = next(s for s in self.sizes if s >= n) if self.graphs else n
        # Only the first W columns of the block tables are written: the kernel reads a row no further
        # than its context, so the rest (stale or scratch) is never read. One flat list, one copy.
        W = min(self.max_blocks, -(-max(len(it.block_table) for it in items) // 16) * 16)
        ids, pos, slots, lens, table = [], [], [], [], []
        for it in items:
            p = it.context_len - 1
            ids.append(it.new_token_ids[0]), pos.append(p), lens.append(it.context_len)
            slots.append(it.block_table[p // bs] * bs + p % bs)
            table += it.block_table
            table += [scratch] * (W - len(it.block_table))
        pad = size - n   # padded rows: token 0 at position 0 in the scratch block
        table += [scratch] * (W * pad)
        self.ids[:size, 0].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:size, 0].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.slots[:size].copy_(torch.tensor(slots + [scratch * bs] * pad), non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        self.block_tables[:size, :W].copy_(torch.tensor(table, dtype=torch.int32).view(size, W), non_blocking=True)
        if self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self._forward(n)
