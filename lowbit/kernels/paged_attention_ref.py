"""Reference paged attention in plain PyTorch: the oracle future GPU kernels are tested against.

Simple over fast: gather every sequence's K/V through its block table into a padded dense tensor, then
masked softmax attention in float32. Handles decode (one query per sequence) and chunked prefill (q_len
new tokens per sequence, already written to the cache, attending causally to everything before them).
"""
from __future__ import annotations

import torch


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float | None = None,
                    q_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of new queries over paged K/V.

    q:            [B, H, Q, hd]   Q new tokens per sequence (Q = 1: decode), right-padded to Q
    k_pool/v_pool:[num_blocks, n_kv, block_size, hd]   (dequantized already if the cache is quantized)
    block_tables: [B, MB] int     physical block of each logical block; entries past a sequence's length
                                  may hold anything (-1 included): they are masked out
    context_lens: [B] int         tokens in the cache per sequence, INCLUDING the Q new ones
    q_lens:       [B] int or None real queries per row (default Q for all); query i of row b sits at
                                  position context_lens[b] - q_lens[b] + i and sees keys 0 .. that position
    returns       [B, H, Q, hd] in q's dtype; padded query rows are zeros.

    GQA: query head h reads KV head h // (H // n_kv), as the decoder's expand does.
    """
    B, H, Q, hd = q.shape
    _, n_kv, bs, _ = k_pool.shape
    rep = H // n_kv
    dev = q.device
    scale = hd ** -0.5 if scale is None else scale
    context_lens = context_lens.to(dev, torch.long)
    q_lens = torch.full((B,), Q, device=dev) if q_lens is None else q_lens.to(dev, torch.long)

    # Gather: [B, MB, n_kv, bs, hd] -> [B, n_kv, S, hd] with S = MB * bs (padding past each length).
    bt = block_tables.to(dev, torch.long).clamp(min=0)
    MB = bt.shape[1]
    k = k_pool[bt].permute(0, 2, 1, 3, 4).reshape(B, n_kv, MB * bs, hd).float()
    v = v_pool[bt].permute(0, 2, 1, 3, 4).reshape(B, n_kv, MB * bs, hd).float()

    # Group query heads by their KV head instead of copying K/V `rep` times: [B, n_kv, rep, Q, hd].
    qg = q.float().reshape(B, n_kv, rep, Q, hd)
    scores = torch.einsum("bgrqd,bgsd->bgrqs", qg, k) * scale             # [B, n_kv, rep, Q, S]

    q_idx = torch.arange(Q, device=dev)
    q_pos = (context_lens - q_lens)[:, None] + q_idx                        # [B, Q]
    q_valid = q_idx[None] < q_lens[:, None]                                 # [B, Q]
    k_pos = torch.arange(MB * bs, device=dev)
    # Causal (key position <= query position) also keeps keys below the context length, since every
    # valid query position is < context_lens[b]. Padded rows see everything (finite), zeroed below.
    allowed = (k_pos[None, None] <= q_pos[:, :, None]) | ~q_valid[:, :, None]    # [B, Q, S]
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bgrqs,bgsd->bgrqd", p, v).reshape(B, H, Q, hd)
    out = torch.where(q_valid[:, None, :, None], out, 0.0)
    return out.to(q.dtype)
