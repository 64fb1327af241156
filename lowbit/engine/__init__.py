"""Serving engine pieces: the paged KV cache (block manager, paged storage, reference paged attention)."""
from lowbit.engine.block_manager import Append, BlockManager, MemoryStats, block_hash
from lowbit.engine.paged_attention import paged_attention
from lowbit.engine.paged_cache import (
    PagedBatchCache,
    PagedKVCache,
    kv_bytes_per_token,
    num_blocks_for_memory,
)

__all__ = [
    "Append",
    "BlockManager",
    "MemoryStats",
    "PagedBatchCache",
    "PagedKVCache",
    "block_hash",
    "kv_bytes_per_token",
    "num_blocks_for_memory",
    "paged_attention",
]
