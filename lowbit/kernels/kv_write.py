"""Store a decode step's new keys and values into the paged pools in one kernel (Triton).

The reference, `pool[blk, :, off] = k` for K and again for V, is two advanced-indexing kernels per
layer, together ~4 µs of a batch-1 step's time per layer on the H100 (benchmarks/results/decode_h100.md);
this is one launch per layer for both. Unquantized pools only: a quantized cache computes scales first
and keeps the reference path.
"""
from __future__ import annotations

import torch

from lowbit.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kv_write_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, blk_ptr, off_ptr, n_kv, s_kn, s_kh, s_vn, s_vh,
                         s_pb, s_ph, s_po, HD: tl.constexpr, BLOCK: tl.constexpr):
        """Program (token n, kv head h): k[n, h, :] -> kpool[blk[n], h, off[n], :], the same for v."""
        pid = tl.program_id(0)
        n, h = pid // n_kv, pid % n_kv
        b, o = tl.load(blk_ptr + n), tl.load(off_ptr + n)
        d = tl.arange(0, BLOCK)
        mask = d < HD
        dst = b * s_pb + h * s_ph + o * s_po + d
        tl.store(kp_ptr + dst, tl.load(k_ptr + n * s_kn + h * s_kh + d, mask=mask), mask=mask)
        tl.store(vp_ptr + dst, tl.load(v_ptr + n * s_vn + h * s_vh + d, mask=mask), mask=mask)


def kv_write(k_pool: torch.Tensor, v_pool: torch.Tensor, blk: torch.Tensor, off: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k_pool/v_pool [num_blocks, n_kv, block_size, hd] (contiguous); blk/off [N]; k/v [N, n_kv, hd]
    (last dim contiguous, pool dtype)."""
    N, n_kv, hd = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _kv_write_kernel[(N * n_kv,)](k, v, k_pool, v_pool, blk, off, n_kv, k.stride(0), k.stride(1), v.stride(0),
                                  v.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), HD=hd,
                                  BLOCK=triton.next_power_of_2(hd), num_warps=1)
