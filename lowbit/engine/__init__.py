"""Serving engine: paged KV cache (block manager, paged storage, reference paged attention), continuous-batching
scheduler, model runner, the `Engine` / `LLM` API and speculative decoding (speculative.py)."""
from lowbit.engine.block_manager import Append, BlockManager, MemoryStats, block_hash
from lowbit.engine.llm import LLM, CompletionOutput, Engine, RequestOutput
from lowbit.kernels.paged_attention_ref import paged_attention
from lowbit.engine.paged_cache import (
    PagedBatchCache,
    PagedKVCache,
    kv_bytes_per_token,
    num_blocks_for_memory,
)
from lowbit.engine.runner import ModelRunner
from lowbit.engine.scheduler import Batch, ScheduledSeq, Scheduler
from lowbit.engine.sequence import SeqStatus, Sequence, TokenLogprob

__all__ = [
    "LLM",
    "Append",
    "Batch",
    "BlockManager",
    "CompletionOutput",
    "Engine",
    "MemoryStats",
    "ModelRunner",
    "PagedBatchCache",
    "PagedKVCache",
    "RequestOutput",
    "ScheduledSeq",
    "Scheduler",
    "SeqStatus",
    "Sequence",
    "TokenLogprob",
    "block_hash",
    "kv_bytes_per_token",
    "num_blocks_for_memory",
    "paged_attention",
]
