"""Model runner: one forward step of a mixed batch (prefill chunks + decodes) over the paged KV cache."""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.engine.paged_cache import PagedBatchCache, PagedKVCache
from lowbit.engine.scheduler import Batch
from lowbit.sampling import sample

_UNSET = object()
# Prefill attention backends. cuDNN's is left out: it builds an execution plan for every new (batch,
# query, key) shape, and a prefill step's shape is new almost every step (host-side ms per step on the
# H100, benchmarks/profile_engine.py); the others are fixed kernels.
_PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    """Owns the PagedKVCache of `model`; `run(batch)` -> next token per scheduled sequence (None where the
    sequence is mid-prefill and samples nothing this step).

    decode_path: pure-decode steps go through the paged decode-attention kernel (`DecodeRunner`), with
    CUDA graphs when cuda_graphs; default: both on a CUDA model, neither elsewhere. Prefill and mixed
    steps always take the gather + SDPA path.
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, kv_quant=_UNSET,
                 decode_path: bool | None = None, cuda_graphs: bool | None = None, max_num_seqs: int = 64):
        self.model = model
        kv_quant = model.kv_quant if kv_quant is _UNSET else kv_quant
        on_gpu = model.device.type == "cuda"
        decode_path = on_gpu if decode_path is None else decode_path
        cuda_graphs = on_gpu and decode_path if cuda_graphs is None else cuda_graphs
        # One extra block beyond the block manager's: the scratch block of padded decode rows.
        self.kv = PagedKVCache(model.config, num_blocks + int(decode_path), block_size, model.dtype,
                               model.device, kv_quant)
        self.decoder = None
        if decode_path:
            from lowbit.engine.cuda_graphs import DecodeRunner
            self.decoder = DecodeRunner(model, self.kv, max_num_seqs, use_graphs=cuda_graphs)

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Last-token logits [B, V] of every scheduled sequence (float32)."""
        for src, dst in batch.copies:                        # copy-on-write before anything is written
            self.kv.copy_block(src, dst)
        items = batch.items
        # One-token items (decodes) run apart from the rest (prefill chunks): on the GPU through the decode
        # path (paged kernel, CUDA graphs), elsewhere as their own gather step, so decodes are not padded to
        # the prefill chunk's length; a step that admits a new request costs one small extra forward.
        decode = self._gather_logits if self.decoder is None else self.decoder.logits
        one = [i for i, it in enumerate(items) if it.q_len == 1]
        if self.decoder is not None:
            one = one[:self.decoder.max_batch]
        if len(one) == len(items):
            return decode(items)
        rest = sorted(set(range(len(items))) - set(one))
        part = self._gather_logits([items[i] for i in rest])                    # [len(rest), V]
        if not one:
            return part
        out = part.new_empty(len(items), part.shape[1])
        out[rest] = part
        out[one] = decode([items[i] for i in one])
        return out

    def _gather_logits(self, items) -> torch.Tensor:
        dev = self.model.device
        T = max(it.q_len for it in items)
        ids = torch.tensor([it.new_token_ids + [0] * (T - it.q_len) for it in items], device=dev)  # [B, T]
        step = PagedBatchCache(self.kv, [it.block_table for it in items],
                               [it.context_len for it in items], [it.q_len for it in items])
        m = self.model
        x, cos, sin, mask = m.embed(ids, step.q_pos, step)
        with sdpa_kernel(_PREFILL_SDPA):
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
