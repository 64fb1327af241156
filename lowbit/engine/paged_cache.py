"""Paged KV storage: per-layer pools of fixed-size blocks that `BlockManager` block tables index.

Layout per layer: K and V pools [num_blocks, n_kv, block_size, head_dim], the layout vLLM's V cache uses
and the one a kernel reading a whole block per KV head wants (one block of one head is contiguous). A
token's place is a flat *slot* = block * block_size + offset. With a KVQuant (int8/fp8) the pools hold
1-byte codes plus a float32 scale per (token, head) [num_blocks, n_kv, block_size, 1], exactly as
`QuantizedKVCache` does, so both caches give back the same numbers for the same tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.analysis.memory import kv_token_bytes
from lowbit.config import ModelConfig
from lowbit.errors import LowbitError
from lowbit.kernels import use_kernels


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float16, kv_quant=None) -> int:
    """Bytes of K and V for one token over all layers, as the pools store them (analysis.kv_token_bytes)."""
    if kv_quant is not None:
        return kv_quant.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    return kv_token_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.empty((), dtype=dtype).element_size())


def num_blocks_for_memory(cfg: ModelConfig, bytes_available: int, block_size: int = 16,
                          dtype: torch.dtype = torch.float16, kv_quant=None) -> int:
    """How many blocks fit in `bytes_available` (what is left after weights and activations)."""
    per_block = block_size * kv_bytes_per_token(cfg, dtype, kv_quant)
    n = int(bytes_available) // per_block
    if n <= 0:
        raise LowbitError(f"KV cache: {bytes_available / 2**20:.1f} MiB left is less than one block "
                          f"({per_block / 2**20:.2f} MiB of {block_size} tokens)")
    return n


class PagedKVCache:
    """K/V block pools for every layer; reads and writes go through slots and block tables."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu", kv_quant=None):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dtype, self.device, self.kv_quant = dtype, torch.device(device), kv_quant
        L, shape = cfg.num_layers, (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        code = dtype if kv_quant is None else kv_quant.code_dtype
        self.k = [torch.zeros(shape, dtype=code, device=device) for _ in range(L)]
        self.v = [torch.zeros(shape, dtype=code, device=device) for _ in range(L)]
        if kv_quant is None:
            self.k_scale = self.v_scale = None
        else:
            sshape = shape[:-1] + (1,)
            self.k_scale = [torch.ones(sshape, device=device) for _ in range(L)]
            self.v_scale = [torch.ones(sshape, device=device) for _ in range(L)]

    @property
    def nbytes(self) -> int:
        ts = self.k + self.v + (self.k_scale + self.v_scale if self.kv_quant is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def _slots(self, slots) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        return s // self.block_size, s % self.block_size

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v [N, n_kv, hd] into flat slots [N] (quantizing them if the cache is quantized).
        slots: flat slot ids, or the (block, offset) pair `_slots` makes of them (computed once per step
        by callers that write every layer)."""
        blk, off = slots if isinstance(slots, tuple) else self._slots(slots)
        if self.kv_quant is None and use_kernels(k) and k.dtype == self.dtype:
            from lowbit.kernels.kv_write import kv_write
            kv_write(self.k[layer], self.v[layer], blk, off, k, v)
            return
        if self.kv_quant is None:
            # Advanced indices around a slice: pool[blk, :, off] is [N, n_kv, hd], matching k.
            self.k[layer][blk, :, off] = k.to(self.dtype)
            self.v[layer][blk, :, off] = v.to(self.dtype)
            return
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.kv_quant.quantize(x)                # [N, n_kv, hd], [N, n_kv, 1]
            codes[layer][blk, :, off] = q
            scales[layer][blk, :, off] = s

    def _read(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pools indexed by any tensor of block ids -> (k, v) [*blocks.shape, n_kv, bs, hd] in self.dtype."""
        if self.kv_quant is None:
            return self.k[layer][blocks], self.v[layer][blocks]
        deq = self.kv_quant.dequantize
        return (deq(self.k[layer][blocks], self.k_scale[layer][blocks], self.dtype),
                deq(self.v[layer][blocks], self.v_scale[layer][blocks], self.dtype))

    def gather(self, layer: int, block_table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` tokens -> contiguous (k, v) [n_kv, length, hd]."""
        n = -(-length // self.block_size)
        if n > len(block_table):
            raise LowbitError(f"paged cache: {length} tokens need {n} blocks, the table has {len(block_table)}")
        blocks = torch.as_tensor(list(block_table[:n]), dtype=torch.long, device=self.device)
        out = []
        for x in self._read(layer, blocks):                                 # [n, n_kv, bs, hd]
            out.append(x.transpose(0, 1).reshape(x.shape[1], n * self.block_size, -1)[:, :length])
        return out[0], out[1]

    def gather_batch(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded block tables [B, MB] -> (k, v) [B, n_kv, MB * bs, hd]; the caller masks past each length."""
        out = []
        for x in self._read(layer, block_tables.clamp(min=0)):              # [B, MB, n_kv, bs, hd]
            B, MB, H, bs, hd = x.shape
            out.append(x.permute(0, 2, 1, 3, 4).reshape(B, H, MB * bs, hd))
        return out[0], out[1]

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) pools of one layer in self.dtype (dequantized copies if quantized): paged_attention's input."""
        return self._read(layer, slice(None))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block src's K/V (and scales) into dst, every layer."""
        ts = self.k + self.v + (self.k_scale + self.v_scale if self.kv_quant is not None else [])
        for t in ts:
            t[dst] = t[src]


class PagedBatchCache:
    """The model-facing cache of one forward step over a batch, backed by a PagedKVCache.

    Implements what `LlamaForCausalLM` calls on a cache (update / attn_mask / advance / pos / pad), so the
    unchanged decoder runs on paged storage: each layer scatters the step's new K/V into its slots, then
    gets back every sequence's context gathered through its block table, right-padded to a common length
    and masked. Row b of the step holds q_lens[b] new tokens (right-padded to T) at positions
    context_lens[b] - q_lens[b] ... context_lens[b] - 1; pass those positions to the model explicitly.
    A gather per layer is the reference path; a paged-attention kernel would replace update + SDPA.
    """

    pad = None
    pos = 0  # unused: positions are always passed explicitly

    def __init__(self, kv: PagedKVCache, block_tables: Sequence[Sequence[int]],
                 context_lens: Sequence[int], q_lens: Sequence[int]):
        self.kv, bs, dev = kv, kv.block_size, kv.device
        T = max(q_lens)                                                       # padded query length
        mb = max(len(t) for t in block_tables)
        self.block_tables = torch.tensor([list(t) + [0] * (mb - len(t)) for t in block_tables],
                                         dtype=torch.long, device=dev)          # [B, MB]
        self.context_lens = torch.tensor(context_lens, dtype=torch.long, device=dev)  # [B]
        self.q_lens = torch.tensor(q_lens, dtype=torch.long, device=dev)              # [B]
        t = torch.arange(T, device=dev)
        self.q_pos = (self.context_lens - self.q_lens)[:, None] + t                   # [B, T]
        self.q_valid = t[None] < self.q_lens[:, None]                                 # [B, T]
        pos = self.q_pos[self.q_valid]                                                # [N]
        rows = self.block_tables[self.q_valid.nonzero()[:, 0], pos // bs]
        self.slots = rows * bs + pos % bs                                             # [N]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, n_kv, T, hd] -> write the valid tokens; return contexts [B, n_kv, MB*bs, hd]."""
        valid = self.q_valid
        self.kv.write(layer, self.slots, k.transpose(1, 2)[valid], v.transpose(1, 2)[valid])  # [N, n_kv, hd]
        return self.kv.gather_batch(layer, self.block_tables)

    def attn_mask(self, T: int) -> torch.Tensor:
        """[B, 1, T, MB*bs]: key j visible to query t iff j <= its position (hence < its context length)."""
        S = self.block_tables.shape[1] * self.kv.block_size
        k_pos = torch.arange(S, device=self.kv.device)
        mask = k_pos[None, None] <= self.q_pos[:, :, None]                            # [B, T, S]
        # Padded query rows would see nothing (NaN from softmax): let them see key 0; their output is junk.
        mask = mask | (~self.q_valid[:, :, None] & (k_pos == 0))
        return mask[:, None]

    def advance(self, T: int) -> None:
        pass
