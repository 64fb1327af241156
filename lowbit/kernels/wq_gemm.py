"""WkA16 GEMM in Triton: 2/4/8-bit weights with group scales, dequantized inside the matmul.

Decode (small M) is memory-bound: the time is the bytes of packed weights read. The kernel reads each
weight once, as int32 words laid out K-major ([K / per_word, N], so a tile's columns are contiguous
and loads coalesce along N), unpacks them in registers, applies its group's scale and offset, and
feeds tensor cores through tl.dot with M padded to 16. When N alone gives too few tiles to fill the
GPU's SMs, K is split across programs (split-K); the last program of a tile to finish adds the fp32
partials (in a fixed order, so results do not depend on timing). Tile width and split come from
`plan`, a rule fitted to a sweep on the H100 (benchmarks/gemm.py). Prefill (large M) is compute-bound: there the weight is dequantized
once by a Triton kernel and multiplied by cuBLAS.

The layout is built once per layer by `repack` (kept on the layer, see WeightOnlyLinear):
  * every quantization scheme becomes `real = code * scale + offset` with unsigned codes
    (symmetric: code + 2^(b-1), offset = -2^(b-1)·scale; integer zero point: offset = -scale·zero;
    real-valued zero point: offset = min), so the kernel has one formula;
  * act-order / ragged groups: columns are sorted by group (x is permuted the same way at run time)
    and the short last group is padded with zero-weighted columns, so every group is contiguous and
    of equal size, and a K tile never straddles two groups.
3-bit codes do not tile an int32 word: those layers keep the reference path.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lowbit.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

KERNEL_BITS = (2, 4, 8)
LARGE_M = 128  # above this many rows: dequantize once + cuBLAS


@dataclasses.dataclass
class PackedWeight:
    """A WkA16 weight in the kernel's layout (see module docstring)."""
    qweight: torch.Tensor        # int32 [Kp // per_word, N]: word i, bits j*b.. hold code of row i*per_word + j
    scale: torch.Tensor          # fp16 [G, N]
    offset: torch.Tensor         # fp16 [G, N]
    perm: torch.Tensor | None    # int64 [K]: kernel column c reads x[:, perm[c]]; None = identity
    in_features: int             # K
    padded_in: int               # Kp = G * group
    group: int                   # columns per group (K for per-channel)
    bits: int
    marlin: object = None        # w4a16.MarlinWeight: the CUDA kernel's layout, where choose_path runs it

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes a forward reads: the layout the kernel for small M takes (both layouts are kept)."""
        if self.marlin is not None:
            return self.marlin.nbytes
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset))


def _block_k(group: int) -> int | None:
    """Largest K tile (>= 16 for tl.dot) that divides the group, so one tile has one scale row."""
    return next((bk for bk in (128, 64, 32, 16) if group % bk == 0), None)


def repack(layer) -> PackedWeight | None:
    """WeightOnlyLinear -> PackedWeight on the layer's device, or None if the kernel cannot take it."""
    spec, N, K = layer.spec, layer.out_features, layer.in_features
    if spec.bits not in KERNEL_BITS:
        return None
    codes = layer.codes().to(torch.int32)                                   # [N, K]
    if spec.symmetric:
        codes = codes + (1 << (spec.bits - 1))                              # signed -> unsigned
    s = layer.scale.float().expand(N, -1)                                   # [N, G] (per-tensor: rows 1)
    if spec.symmetric:
        off = -(1 << (spec.bits - 1)) * s
    elif spec.float_zero:
        off = layer.zero.float().expand(N, -1)
    else:
        off = -s * layer.zero.float().expand(N, -1)
    G = s.shape[1]
    group = K if spec.group_size <= 0 else spec.group_size
    gid = (layer.g_idx.long() if layer.g_idx is not None
           else torch.arange(K, device=codes.device) // group)              # [K]
    counts = torch.bincount(gid, minlength=G)
    if bool((counts[:-1] != group).any()) or int(counts[-1]) > group or _block_k(group) is None:
        return None  # groups the padded layout cannot express: reference path
    perm = None
    if bool((gid[1:] < gid[:-1]).any()):                                    # act order: sort columns
        perm = torch.argsort(gid, stable=True)                              # [K]
        codes = codes[:, perm]
    Kp = G * group
    per = 32 // spec.bits
    codes = F.pad(codes, (0, Kp - K))                                       # [N, Kp]; kernels read x[K:] as 0
    words = codes.t().contiguous().reshape(Kp // per, per, N).long()        # [Kp/per, per, N]
    shifts = (torch.arange(per, device=codes.device) * spec.bits).reshape(1, per, 1)
    words = (words << shifts).sum(1)                                        # [Kp/per, N], disjoint bits
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    pw = PackedWeight(words.contiguous(), s.t().contiguous().half(), off.t().contiguous().half(),
                      perm, K, Kp, group, spec.bits)
    if codes.is_cuda:
        from lowbit.kernels import w4a16
        if w4a16.eligible(pw) and w4a16.available(codes.device):
            pw.marlin = w4a16.marlin_repack(pw)
    return pw


def unpack_codes(pw: PackedWeight) -> torch.Tensor:
    """The unsigned codes [Kp, N] (int64, kernel column order, padded rows included)."""
    per = 32 // pw.bits
    w = pw.qweight.long() & 0xFFFFFFFF                                      # [Kp/per, N]
    shifts = (torch.arange(per, device=w.device) * pw.bits).reshape(1, per, 1)
    return ((w[:, None, :] >> shifts) & ((1 << pw.bits) - 1)).reshape(pw.padded_in, -1)  # [Kp, N]


def dequantize_packed(pw: PackedWeight, dtype=torch.float32) -> torch.Tensor:
    """Reference unpacking of the kernel layout -> weight [N, K] in the ORIGINAL column order (tests)."""
    codes = unpack_codes(pw)                                                # [Kp, N]
    g = torch.arange(pw.padded_in, device=codes.device) // pw.group        # [Kp]
    real = codes.float() * pw.scale.float()[g] + pw.offset.float()[g]       # [Kp, N]
    real = real[:pw.in_features].t()                                        # [N, K] kernel order
    if pw.perm is not None:
        real = torch.empty_like(real).index_copy_(1, pw.perm, real)          # undo the column sort
    return real.to(dtype)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device) -> torch.Tensor:
    """Per-tile arrival counters of split-K; every kernel leaves them at zero again."""
    if device not in _LOCKS:
        _LOCKS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    return _LOCKS[device]


if HAS_TRITON:
    @triton.jit
    def _dequant_tile(w_ptr, s_ptr, o_ptr, k0, offs_n, n_mask, N, GROUP,
                      BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, UNPACK_3D: tl.constexpr):
        """Rows k0 .. k0+BLOCK_K of the weight (one group) -> fp32 tile [BLOCK_K, BLOCK_N].

        UNPACK_3D: load each word once and split it in registers ([BK/PER, PER, BN] -> [BK, BN]);
        otherwise every row loads its own word (PER rows share it through L1) and shifts. Which is
        faster depends on the shape (benchmarks/gemm.py --sweep).
        """
        PER: tl.constexpr = 32 // BITS
        if UNPACK_3D:
            offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            shifts = tl.arange(0, PER) * BITS
            codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BK/PER, PER, BN]
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))                  # row i*PER + j
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(w_ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
            codes = (words >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1)  # [BK, BN]
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        return codes.to(tl.float32) * s[None, :] + o[None, :]

    @triton.jit
    def _k_range(pid_k, Kp, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """K tiles [start, end) of split pid_k: the Kp / BLOCK_K tiles dealt out in SPLIT contiguous runs."""
        k_tiles = Kp // BLOCK_K
        per_split = tl.cdiv(k_tiles, SPLIT)
        start = pid_k * per_split
        return start, tl.minimum(start + per_split, k_tiles)

    @triton.jit
    def _store_split_k(acc, out_ptrs, mask, ws_ptr, lock_ptr, tile, pid_k, lanes, SPLIT: tl.constexpr,
                       TILE: tl.constexpr):
        """Write a program's fp32 result `acc` to out_ptrs. With SPLIT > 1 it is one of SPLIT partials of
        output tile `tile` (TILE values, `lanes` their flat index): each is stored to the workspace, and
        the last program to arrive at the tile's counter adds them up in split order (results do not
        depend on timing), writes the output and resets the counter for the next call."""
        if SPLIT == 1:
            tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptr + (tile * SPLIT + pid_k) * TILE + lanes, acc)
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")   # releases the partial above
            if arrived == SPLIT - 1:                                        # the last one reduces
                total = tl.zeros_like(acc)
                for sp in range(0, SPLIT):
                    total += tl.load(ws_ptr + (tile * SPLIT + sp) * TILE + lanes, cache_modifier=".cg")
                tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)

    @triton.jit
    def _wq_gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, Kp, GROUP, stride_xm,
                        BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        SPLIT: tl.constexpr, UNPACK_3D: tl.constexpr):
        """out[m, n] = sum_k x[m, k] w[k, n]. With SPLIT > 1 the K tiles are shared by SPLIT programs whose
        partials `_store_split_k` adds up (no extra reduction kernel)."""
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = offs_m < M, offs_n < N
        t_start, t_end = _k_range(pid_k, Kp, BLOCK_K, SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(t_start, t_end):
            k0 = t * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)   # x is not padded to Kp
            w = _dequant_tile(w_ptr, s_ptr, o_ptr, k0, offs_n, n_mask, N, GROUP, BITS, BLOCK_K, BLOCK_N, UNPACK_3D)
            acc += tl.dot(x, w.to(x.dtype))
        lanes = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        _store_split_k(acc, out_ptr + offs_m[:, None] * N + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                       ws_ptr, lock_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, lanes, SPLIT, BLOCK_M * BLOCK_N)

    @triton.jit
    def _wq_gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, out_ptr, ws_ptr, lock_ptr, N, K, Kp, GROUP,
                        BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
        """out[n] = sum_k x[k] w[k, n] for ONE row of x (batch-1 decode), without tensor cores.

        tl.dot would pad M to 16 and push every dequantized tile through a shared-memory layout change;
        here each word is split in registers and multiplied into a [BLOCK_K / PER, BLOCK_N] fp32
        accumulator that is reduced once at the end. Codes become floats with the exponent trick
        (code | 0x4B000000 is the float 2^23 + code), integer logic + one FSUB instead of the slow
        int->float conversion. Group affine terms are applied per tile: sum_k x (c s + o) =
        s * sum_k x c + o * sum_k x. Split-K as in _wq_gemm_kernel."""
        PER: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BLOCK_K // PER
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, BKW)
        t_start, t_end = _k_range(pid_k, Kp, BLOCK_K, SPLIT)
        acc = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(t_start, t_end):
            words = tl.load(w_ptr + (t * BKW + offs_w)[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                            other=0)                                         # [BKW, BN] int32
            part = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BKW,), dtype=tl.float32)
            for j in tl.static_range(PER):
                c = ((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000
                cf = c.to(tl.float32, bitcast=True) - 8388608.0               # exact code as float
                kj = t * BLOCK_K + offs_w * PER + j                              # [BKW] rows i*PER + j
                xj = tl.load(x_ptr + kj, mask=kj < K, other=0.0).to(tl.float32)
                part += xj[:, None] * cf
                xsum += xj
            g = (t * BLOCK_K) // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            acc_o += tl.sum(xsum, axis=0) * o
        y = tl.sum(acc, axis=0) + acc_o                                      # [BN]
        _store_split_k(y, out_ptr + offs_n, n_mask, ws_ptr, lock_ptr, pid_n, pid_k, tl.arange(0, BLOCK_N),
                       SPLIT, BLOCK_N)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, GROUP,
                        BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Whole weight -> out [Kp, N] in out's dtype (the prefill path's cuBLAS operand)."""
        k0 = tl.program_id(0) * BLOCK_K
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w = _dequant_tile(w_ptr, s_ptr, o_ptr, k0, offs_n, n_mask, N, GROUP, BITS, BLOCK_K, BLOCK_N, False)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_mask[None, :])


def plan(M: int, N: int, Kp: int, block_k: int) -> dict:
    """Kernel config for a decode-sized GEMM, fitted to a sweep on the H100 (Llama-3-8B shapes, M = 1 and
    16, BLOCK_N 32/64/128 x split 1..16 x both unpackings): 128-wide N tiles (32 for narrow layers), the
    one-load-per-word unpacking, and K split until there are ~512 programs (~4 per SM)."""
    block_n = 128 if N >= 4096 else 32
    tiles = -(-N // block_n) * -(-M // 16)
    split = 1
    while split < 16 and tiles * split * 2 <= 512 and Kp // block_k >= 4 * split:
        split *= 2
    return {"BLOCK_N": block_n, "SPLIT": split, "UNPACK_3D": True}


def plan_gemv(N: int, Kp: int, block_k: int) -> dict:
    """GEMV (M = 1) config, fitted to a sweep on the H100 (benchmarks/wq_sweep.py: BLOCK_N 64/128/256 x
    split 1..32 x 2/4/8 warps on Llama-3-8B shapes): 64-wide tiles of 2 warps, K split until there
    are >= 1024 programs (~8 per SM), at most 32 ways and at least one K tile per split."""
    tiles, split = -(-N // 64), 1
    while split < 32 and tiles * split < 1024 and Kp // block_k >= 2 * split:
        split *= 2
    return {"GEMV": True, "BLOCK_N": 64, "SPLIT": split, "num_warps": 2}


def dequantize_weight(pw: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The Triton dequantization: [Kp, N] in dtype (kernel column order, padded rows included)."""
    N, bk = pw.out_features, _block_k(pw.group)
    out = torch.empty(pw.padded_in, N, dtype=dtype, device=pw.qweight.device)
    grid = (pw.padded_in // bk, triton.cdiv(N, 64))
    _dequant_kernel[grid](pw.qweight, pw.scale, pw.offset, out, N, pw.group, BITS=pw.bits, BLOCK_K=bk,
                          BLOCK_N=64, num_warps=4)
    return out


def choose_path(M: int, pw: PackedWeight, config: dict | None) -> str:
    """Which kernel: config["path"], else (old-style configs) "gemv" / "dot" by config["GEMV"], else the
    fastest measured on the H200 (benchmarks/results/gemm_h200.md, six Llama-3 8B/70B shapes; decode_h200
    for SmolLM2's small layers, where the CUDA kernel's fixed cost loses): the CUDA kernel at M = 1 on
    layers of >= 2^22 weights, up to M = 16 (32) on layers of >= 2^25 (2^27); dequantize + cuBLAS above
    LARGE_M and, above M = 64, on layers narrower than 14336 outputs; the Triton kernels between."""
    if config:
        if "path" in config:
            return config["path"]
        return "gemv" if M == 1 and config.get("GEMV", True) else "dot"
    size = pw.out_features * pw.in_features
    marlin = (M == 1 and size >= 1 << 22) or (M <= 16 and size >= 1 << 25) or (M <= 32 and size >= 1 << 27)
    if pw.marlin is not None and marlin:
        return "marlin"
    if M > LARGE_M or (M > 64 and pw.out_features < 14336):
        return "dequant"
    return "gemv" if M == 1 else "dot"


def wq_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] (fp16/bf16) with W in the kernel layout; y in x's dtype.
    config (tests, sweeps) picks the kernel and its tiles instead of choose_path and the plans:
    {"path": "marlin", "split"}, {"path": "dequant"}, {"path": "dot" (or "GEMV": False), "BLOCK_N",
    "SPLIT", "UNPACK_3D", ["BLOCK_M", "num_warps", "num_stages"]},
    {"path": "gemv" (or "GEMV": True), "BLOCK_N", "SPLIT", "num_warps"} (M = 1)."""
    lead, K, N = x.shape[:-1], pw.in_features, pw.out_features
    x2 = x.reshape(-1, K)                                                   # [M, K]
    if pw.perm is not None:
        x2 = x2[:, pw.perm]                                                 # kernel column order
    x2 = x2.contiguous()      # [M, K]: the kernels mask the padded columns K..Kp instead of padding x
    M = x2.shape[0]
    path = choose_path(M, pw, config)
    cfg = {k: v for k, v in (config or {}).items() if k not in ("path", "GEMV")}
    if path == "marlin":
        from lowbit.kernels.w4a16 import w4a16_linear
        y = w4a16_linear(x2, pw.marlin, cfg.get("split"))
    elif path == "dequant":
        y = x2 @ dequantize_weight(pw, x.dtype)[:K]                        # [M, N] cuBLAS
    elif path == "gemv":
        bk = _block_k(pw.group)
        cfg = cfg or plan_gemv(N, pw.padded_in, bk)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT"])
        y = torch.empty((1, N), device=x.device, dtype=x.dtype)
        ws = torch.empty(grid[0] * cfg["BLOCK_N"] * cfg["SPLIT"] if cfg["SPLIT"] > 1 else 1,
                         device=x.device, dtype=torch.float32)
        _wq_gemv_kernel[grid](x2, pw.qweight, pw.scale, pw.offset, y, ws, _locks(x.device), N, K, pw.padded_in,
                              pw.group, BITS=pw.bits, BLOCK_K=bk, BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg["SPLIT"],
                              num_warps=cfg.get("num_warps", 4))
    else:
        bk = _block_k(pw.group)
        cfg = cfg or plan(M, N, pw.padded_in, bk)
        bm = cfg.pop("BLOCK_M", 16 if M <= 16 else 32 if M <= 32 else 64)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 3)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT"], triton.cdiv(M, bm))
        y = torch.empty((M, N), device=x.device, dtype=x.dtype)
        # Split-K partials, fp32: one [bm, BLOCK_N] tile per (m-tile, n-tile, split); none without a split.
        ws = torch.empty(grid[0] * grid[2] * bm * cfg["BLOCK_N"] * cfg["SPLIT"] if cfg["SPLIT"] > 1 else 1,
                         device=x.device, dtype=torch.float32)
        _wq_gemm_kernel[grid](x2, pw.qweight, pw.scale, pw.offset, y, ws, _locks(x.device), M, N, K, pw.padded_in,
                              pw.group, x2.stride(0), BITS=pw.bits, BLOCK_M=bm, BLOCK_K=bk,
                              num_warps=warps, num_stages=stages, **cfg)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, N)
