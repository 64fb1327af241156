"""Model runner: one forward step of a mixed batch (prefill chunks + decodes) over the paged KV cache."""
from __future__ import annotations

import torch

from lowbit.engine.paged_cache import PagedBatchCache, PagedKVCache
from lowbit.engine.scheduler import Batch
from lowbit.sampling import sample

_UNSET = object()


class ModelRunner:
    """Owns the PagedKVCache of `model`; `run(batch)` -> next token per scheduled sequence (None where the
    sequence is mid-prefill and samples nothing this step)."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, kv_quant=_UNSET):
        self.model = model
        kv_quant = model.kv_quant if kv_quant is _UNSET else kv_quant
        self.kv = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device, kv_quant)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Last-token logits [B, V] of every scheduled sequence (float32)."""
        for src, dst in batch.copies:                        # copy-on-write before anything is written
            self.kv.copy_block(src, dst)
        items, dev = batch.items, self.model.device
        T = max(it.q_len for it in items)
        ids = torch.tensor([it.new_token_ids + [0] * (T - it.q_len) for it in items], device=dev)  # [B, T]
        step = PagedBatchCache(self.kv, [it.block_table for it in items],
                               [it.context_len for it in items], [it.q_len for it in items])
        m = self.model
        x, cos, sin, mask = m.embed(ids, step.q_pos, step)
        for layer in m.model.layers:
            x = layer(x, cos, sin, step, mask)
        last = step.q_lens - 1                                                  # [B] right padding
        x = x[torch.arange(len(items), device=dev), last]                       # [B, d]
        return m.head(x).float()

    def run(self, batch: Batch) -> list[int | None]:
        if not batch.items:
            return []
        logits = self.logits(batch)
        out: list[int | None] = []
        for i, it in enumerate(batch.items):
            if not it.needs_sample:
                out.append(None)
                continue
            gen = it.seq.get_generator(logits.device)
            out.append(int(sample(logits[i:i + 1], it.seq.params, gen)[0]))
        return out
