"""Paged decode attention in Triton: one new query per sequence over K/V held in fixed-size blocks.

The kernel (flash-decoding): program (b, kv head, split) walks its share of sequence b's tokens through
the block table, keeps an online softmax in float32 and writes either the final output (one split) or a
partial (row max, row sum, unnormalized acc) that a second small kernel merges by the log-sum-exp rule.
All `rep = H // n_kv` query heads of one KV head share a program, so each K/V tile is read from HBM once.
int8 / fp8 caches are dequantized in the kernel: codes are exact in bf16/fp16, so the dot runs on the
codes and the per-token scale multiplies the scores (K) or the probabilities (V) instead of every element.

`decode_attention` dispatches: the kernel where `use_kernels(q)`, else the PyTorch reference
`lowbit.kernels.paged_attention_ref.paged_attention` (the oracle), so everything works without a GPU.
"""
from __future__ import annotations

import os

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import HAS_TRITON, use_kernels

LOG2E = 1.4426950408889634
DEFAULT_SMS = 132               # H100 SXM; used when q is not on a CUDA device (the Triton interpreter)
MIN_TOKENS_PER_SPLIT = 256      # below this a split's partial write + merge costs more than it saves
MAX_SPLITS = 64
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                       qk_scale, n_kv, num_splits, max_tokens,
                       s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                       s_sb, s_sh, s_st, s_btb, s_ob, s_oh, s_od,
                       H: tl.constexpr, REP: tl.constexpr, REP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                       QUANT: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """Grid (B * n_kv, num_splits). Rows of every tile are the REP query heads, padded to REP_PAD."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // n_kv
        kvh = pid % n_kv
        ctx = tl.load(ctx_ptr + b)
        # Split s owns tokens [lo, hi); chunks are multiples of BLOCK_N so no tile is read by two splits.
        per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        # max_tokens = MB * BLOCK_SIZE: a context longer than its table attends to the table, as the
        # reference does, instead of reading past the table.
        hi = tl.minimum(tl.minimum(lo + per_split, ctx), max_tokens)

        r = tl.arange(0, REP_PAD)                                   # query row within the KV group
        d = tl.arange(0, HD_PAD)
        heads = kvh * REP + r
        row_ok = r < REP
        if HEAD_DIM == HD_PAD:
            q_mask = row_ok[:, None]
        else:
            q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd, mask=q_mask, other=0.0)

        m_i = tl.full([REP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_PAD], tl.float32)
        acc = tl.zeros([REP_PAD, HD_PAD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            tok = start + n
            valid = tok < hi
            # Page of every token of the tile (BLOCK_N // BLOCK_SIZE distinct ones, L1-cached); masked so
            # table entries past the sequence (possibly -1) are never read.
            page = tl.load(bt_ptr + b * s_btb + tok // BLOCK_SIZE, mask=valid, other=0)
            page = tl.maximum(page, 0).to(tl.int64)         # a -1 inside the context: block 0, like the reference
            slot = tok % BLOCK_SIZE
            s_off = page * s_sb + kvh * s_sh + slot * s_st                              # scales, if QUANT
            if HEAD_DIM == HD_PAD:
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
            # No `other=` on these loads (Triton cannot cast an int constant to fp8): masked lanes are
            # zeroed after the conversion instead, so a junk fp8 NaN can never reach the dots.
            k_off = page * s_kb + kvh * s_kh + slot * s_kt                              # [BLOCK_N]
            k = tl.load(k_ptr + k_off[:, None] + d[None, :] * s_kd, mask=kv_mask)
            if QUANT:   # codes go through float32: exact, and the interpreter botches int8 -> bf16
                k = k.to(tl.float32)
            k = tl.where(kv_mask, k.to(q.dtype), 0.0)                                  # [BLOCK_N, HD_PAD]
            v_off = page * s_vb + kvh * s_vh + slot * s_vt
            v = tl.load(v_ptr + v_off[:, None] + d[None, :] * s_vd, mask=kv_mask)
            if QUANT:
                v = v.to(tl.float32)
            v = tl.where(kv_mask, v.to(q.dtype), 0.0)

            # Scores [REP_PAD, BLOCK_N] in log2 units. tl.dot needs M >= 16, hence REP_PAD >= 16: the padded
            # rows waste tensor-core work that is free here (the kernel waits on HBM), whereas a
            # broadcast-multiply-sum would hold a [REP, BLOCK_N, HD] product and reduce across threads.
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if QUANT:
                s = s * tl.load(ks_ptr + s_off, mask=valid, other=0.0)[None, :]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))                   # finite: every tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if QUANT:
                # sum_t p[t] * code[t] * scale[t]: fold the V scale into p, keep the codes exact.
                p = p * tl.load(vs_ptr + s_off, mask=valid, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if SPLIT:
            # Partials are contiguous [B, H, S] (m, l) and [B, H, S, HD_PAD] (acc); an empty split leaves
            # m = -inf, l = 0, acc = 0, which the merge weighs by exp2(-inf) = 0.
            row = (b * H + heads) * num_splits + split                                  # [REP_PAD]
            tl.store(m_ptr + row, m_i, mask=row_ok)
            tl.store(l_ptr + row, l_i, mask=row_ok)
            tl.store(acc_ptr + row[:, None] * HD_PAD + d[None, :], acc, mask=row_ok[:, None])
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :] * s_od,
                     o.to(out_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, s_ob, s_oh, s_od,
                      H: tl.constexpr, HEAD_DIM: tl.constexpr, HD_PAD: tl.constexpr):
        """Grid (B * H,): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, merged one split at a
        time (any number of splits, registers for one [HD_PAD] row)."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        d = tl.arange(0, HD_PAD)
        # Scalar tensors, not Python floats: a constexpr cannot be reassigned in a loop.
        big = tl.full([], float("-inf"), tl.float32)                # running max M
        total = tl.full([], 0.0, tl.float32)
        o = tl.zeros([HD_PAD], tl.float32)
        for s in range(num_splits):
            m_s = tl.load(m_ptr + pid * num_splits + s)
            l_s = tl.load(l_ptr + pid * num_splits + s)
            a_s = tl.load(acc_ptr + (pid * num_splits + s) * HD_PAD + d)
            new = tl.maximum(big, m_s)
            new = tl.where(new == float("-inf"), 0.0, new)          # only empty splits so far: weigh 0, not NaN
            c_old = tl.exp2(big - new)
            c_s = tl.exp2(m_s - new)
            total = total * c_old + l_s * c_s
            o = o * c_old + a_s * c_s
            big = tl.maximum(big, m_s)
        o = o / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * s_ob + h * s_oh + d * s_od, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def auto_num_splits(batch: int, n_kv: int, max_tokens: int, num_sms: int = DEFAULT_SMS) -> int:
    """Splits per sequence so that about 2 programs per SM run, each over >= MIN_TOKENS_PER_SPLIT tokens.

    max_tokens is an upper bound on the context (block-table width * block size): reading the real
    context lengths would cost a device-to-host sync on every layer of every decode step.
    """
    programs = batch * n_kv
    if programs >= num_sms:                 # the batch alone fills the GPU: splitting only adds a merge
        return 1
    want = -(-2 * num_sms // programs)
    return max(1, min(want, max_tokens // MIN_TOKENS_PER_SPLIT, MAX_SPLITS))


def default_config(head_dim: int, quantized: bool) -> tuple[int, int, int]:
    """(tokens per tile BLOCK_N, num_warps, num_stages). An untuned starting point: a 64-token tile is
    16 KB of K and 16 KB of V at bf16 / hd 128, enough bytes in flight with 2-3 programs per SM; time the
    alternatives with `benchmarks/paged_attention.py --sweep`."""
    return 64, 4, 2


def _check(q, k_pool, v_pool, block_tables, context_lens, k_scale, v_scale):
    if q.ndim != 3 or k_pool.ndim != 4 or v_pool.shape != k_pool.shape:
        raise LowbitError(f"paged decode attention: expected q [B, H, hd] and pools [blocks, n_kv, bs, hd], "
                          f"got q {tuple(q.shape)}, k {tuple(k_pool.shape)}, v {tuple(v_pool.shape)}")
    B, H, hd = q.shape
    n_kv = k_pool.shape[1]
    if k_pool.shape[3] != hd or H % n_kv:
        raise LowbitError(f"paged decode attention: q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} "
                          f"(head_dim must match, H must be a multiple of n_kv)")
    if block_tables.ndim != 2 or block_tables.shape[0] != B or tuple(context_lens.shape) != (B,):
        raise LowbitError(f"paged decode attention: block_tables {tuple(block_tables.shape)} / context_lens "
                          f"{tuple(context_lens.shape)} do not match batch {B}")
    quantized = k_pool.dtype in CODE_DTYPES
    if quantized != (k_scale is not None and v_scale is not None) or v_pool.dtype != k_pool.dtype:
        raise LowbitError(f"paged decode attention: {k_pool.dtype}/{v_pool.dtype} pools need k_scale and v_scale "
                          f"exactly when they hold int8/fp8 codes")
    if quantized and (k_scale.shape != k_pool.shape[:3] + (1,) or v_scale.shape != k_scale.shape):
        raise LowbitError(f"paged decode attention: scales must be [blocks, n_kv, bs, 1], got "
                          f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}")
    return quantized


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           num_splits: int | None = None, *,
                           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Triton decode attention over a paged cache.

    q:             [B, H, hd] bf16/fp16/fp32, one query per sequence (RoPE applied)
    k_pool/v_pool: [num_blocks, n_kv, block_size, hd] float, or int8 / float8_e4m3fn codes
    k_scale/v_scale: float32 [num_blocks, n_kv, block_size, 1] for codes (real = code * scale), else None
    block_tables:  int [B, MB]; entries past a sequence's blocks are never read
    context_lens:  int [B] tokens to attend to, the current one included (>= 1)
    num_splits:    sequence splits (flash-decoding); None picks one from the batch and the table width
    config:        (BLOCK_N, num_warps, num_stages) override, for tuning
    returns        [B, H, hd] in q's dtype; dot products run in q's dtype with float32 accumulation.
    """
    if not HAS_TRITON:
        raise LowbitError("paged_decode_attention needs triton (pip install triton); use decode_attention")
    quantized = _check(q, k_pool, v_pool, block_tables, context_lens, k_scale, v_scale)
    others = (k_pool, v_pool, block_tables, context_lens) + ((k_scale, v_scale) if quantized else ())
    if any(t.device != q.device for t in others):
        raise LowbitError(f"paged decode attention: every tensor must be on {q.device}")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise LowbitError("paged_decode_attention runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    B, H, hd = q.shape
    _, n_kv, bs, _ = k_pool.shape
    rep = H // n_kv
    if hd < 16 or hd > 256:
        raise LowbitError(f"paged decode attention: head_dim {hd} not supported (16..256)")
    scale = hd ** -0.5 if scale is None else float(scale)
    block_n, warps, stages = config or default_config(hd, quantized)
    if num_splits is None:
        num_splits = auto_num_splits(B, n_kv, block_tables.shape[1] * bs, _num_sms(q.device))
    num_splits = max(1, int(num_splits))
    hd_pad = max(16, triton.next_power_of_2(hd))
    out = torch.empty(B, H, hd, device=q.device, dtype=q.dtype)
    if num_splits > 1:
        m = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty(B, H, num_splits, hd_pad, device=q.device, dtype=torch.float32)
    else:
        m = l = acc = out                                           # unused: the kernel stores to out
    if quantized:
        # One set of strides serves both scale tensors (the cache allocates them alike).
        ks, vs = k_scale.float(), v_scale.float()
        if ks.stride() != vs.stride():
            ks, vs = ks.contiguous(), vs.contiguous()
        s_scale = ks.stride()[:3]
    else:
        ks, vs, s_scale = k_pool, v_pool, (0, 0, 0)                # dummies, never read
    _decode_kernel[(B * n_kv, num_splits)](
        q, k_pool, v_pool, ks, vs, block_tables, context_lens, out, m, l, acc,
        scale * LOG2E, n_kv, num_splits, block_tables.shape[1] * bs,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *s_scale, block_tables.stride(0), *out.stride(),
        H=H, REP=rep, REP_PAD=max(16, triton.next_power_of_2(rep)), HEAD_DIM=hd, HD_PAD=hd_pad,
        BLOCK_SIZE=bs, BLOCK_N=block_n, QUANT=quantized, SPLIT=num_splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    if num_splits > 1:
        _merge_kernel[(B * H,)](m, l, acc, out, num_splits, *out.stride(), H=H, HEAD_DIM=hd, HD_PAD=hd_pad,
                                num_warps=1)
    return out


def _reference(q, k_pool, v_pool, block_tables, context_lens, scale, k_scale, v_scale):
    """The PyTorch oracle on q [B, H, hd]; quantized pools are dequantized (float32) only where referenced."""
    if k_pool.dtype in CODE_DTYPES:
        B, MB = block_tables.shape
        bt = block_tables.long().clamp(min=0)                               # [B, MB]
        # Dequantize only the referenced blocks: [B, MB, n_kv, bs, hd] -> compact pool [B*MB, n_kv, bs, hd],
        # whose table is then just 0 .. B*MB-1 in rows.
        k_pool = (k_pool[bt].float() * k_scale[bt]).flatten(0, 1)
        v_pool = (v_pool[bt].float() * v_scale[bt]).flatten(0, 1)
        block_tables = torch.arange(B * MB, device=bt.device).view(B, MB)   # [B, MB]
    from lowbit.kernels.paged_attention_ref import paged_attention  # lazy: lowbit.engine imports the whole engine
    out = paged_attention(q[:, :, None], k_pool, v_pool, block_tables, context_lens, scale)   # [B, H, 1, hd]
    return out[:, :, 0]                                                                       # [B, H, hd]


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """paged_decode_attention where `use_kernels(q)`, else the reference (same arguments, same result)."""
    quantized = _check(q, k_pool, v_pool, block_tables, context_lens, k_scale, v_scale)
    hd = q.shape[-1]
    if use_kernels(q) and 16 <= hd <= 256:
        return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, scale, k_scale, v_scale,
                                      num_splits)
    return _reference(q, k_pool, v_pool, block_tables, context_lens, scale,
                      k_scale if quantized else None, v_scale if quantized else None)
