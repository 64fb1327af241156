"""Marlin-class W4A16 for decode-sized batches (M <= 32): a CUDA kernel, compiled at first use.

The kernel (csrc/w4a16.cu; its header says why it is fast) takes 4-bit codes in a layout of its own,
built here from the Triton kernel's PackedWeight by `marlin_repack`. It is compiled with `nvcc` for the
GPU in hand the first time it is needed and cached under ~/.cache/lowbit (LOWBIT_CACHE); where there is
no nvcc, no GPU of compute capability >= 8.0, or the build fails, `available()` is False and the Triton
kernel (wq_gemm.py) runs instead. `marlin_dequantize` is the layout's PyTorch reference twin (tests).

Layout, for codes W[N, Kp] (Kp padded to a multiple of 128, the kernel's stage, with zero codes; x is
padded with zeros):
  qweight int32 [N/16, Kp/64, 32, 4]: row block rb (16 features), chunk c (64 k), lane l = 4 g + t, MMA
      step st: the word's nibble h + (0, 4, 2, 6)[e] holds W[16 rb + 8 h + g, 64 c + 16 t + 4 st + e];
  scale_offset fp16 [N/16, G, 16, 2]: (scale, offset) of feature 16 rb + r in group G.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.kernels.build import build_library

ROWS_B = 256                 # as in csrc/w4a16.cu: output features per block (8 warps of 32)
_SRC = Path(__file__).parent / "csrc" / "w4a16.cu"
_NIBBLE = (0, 4, 2, 6)       # nibble of element e (of a step's 4 k) in the low row half h = 0


def _nibble_shifts(device) -> torch.Tensor:
    """Bit offset of code (h, e) in its word: 4 (h + _NIBBLE[e]), [2, 4]."""
    return 4 * (torch.arange(2, device=device)[:, None] + torch.tensor(_NIBBLE, device=device)[None, :])


@dataclasses.dataclass
class MarlinWeight:
    """A 4-bit weight in the kernel's layout (module docstring)."""
    qweight: torch.Tensor        # int32 [N/16, Kc, 32, 4]
    scale_offset: torch.Tensor   # fp16 [N/16, G, 16, 2]
    in_features: int             # K of x as the caller gives it (kernel column order)
    padded_in: int               # 64 Kc
    group: int                   # columns per group

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0] * 16

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * 4 + self.scale_offset.numel() * 2


def eligible(pw) -> bool:
    """Whether a wq_gemm.PackedWeight fits this kernel: 4-bit, N % 32 == 0, groups of 64k (or one group)."""
    one_group = pw.scale.shape[0] == 1
    return pw.bits == 4 and pw.out_features % 32 == 0 and (pw.group % 64 == 0 or one_group)


def marlin_repack(pw) -> MarlinWeight:
    """wq_gemm.PackedWeight (4-bit) -> MarlinWeight, on the same device, in the same column order."""
    from lowbit.kernels.wq_gemm import unpack_codes
    codes = unpack_codes(pw)                                              # [Kp, N] int64, kernel order
    N, Kp = codes.shape[1], codes.shape[0]
    Kp64 = -(-Kp // 128) * 128                                            # whole stages of two chunks
    codes = F.pad(codes.t(), (0, Kp64 - Kp))                              # [N, Kp64]
    Kc = Kp64 // 64
    c = codes.reshape(N // 16, 2, 8, Kc, 4, 4, 4)                         # [rb, h, g, c, t, st, e]
    c = c.permute(0, 3, 2, 4, 5, 1, 6)                                    # [rb, c, g, t, st, h, e]
    words = (c << _nibble_shifts(c.device)).sum((-1, -2))                 # [rb, c, g, t, st], disjoint bits
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    qweight = words.reshape(N // 16, Kc, 32, 4).contiguous()
    G = pw.scale.shape[0]
    so = torch.stack((pw.scale, pw.offset), -1)                           # [G, N, 2]
    if G > 1 and Kp64 > Kp:  # the padded chunks' group: zero scale and offset (x is zero there too)
        extra = -(-(Kp64 - Kp) // pw.group)
        so = F.pad(so, (0, 0, 0, 0, 0, extra))                           # [G + extra, N, 2]
        G += extra
    so = so.reshape(G, N // 16, 16, 2).permute(1, 0, 2, 3).contiguous().half()  # [N/16, G, 16, 2]
    group = pw.group if G > 1 else Kp64
    return MarlinWeight(qweight, so, pw.in_features, Kp64, group)


def marlin_dequantize(mw: MarlinWeight, dtype=torch.float32) -> torch.Tensor:
    """The reference: MarlinWeight -> W [N, K] (kernel column order), by the layout's definition."""
    w = mw.qweight.long() & 0xFFFFFFFF                                    # [rb, c, 32, 4]
    nb, Kc = w.shape[:2]
    w = w.reshape(nb, Kc, 8, 4, 4)                                        # [rb, c, g, t, st]
    codes = (w[..., None, None] >> _nibble_shifts(w.device)) & 0xF      # [rb, c, g, t, st, h, e]
    codes = codes.permute(0, 5, 2, 1, 3, 4, 6).reshape(nb * 16, Kc * 64)  # [N, Kp64]
    so = mw.scale_offset.float()                                          # [rb, G, 16, 2]
    s = so[..., 0].permute(0, 2, 1).reshape(nb * 16, -1)                  # [N, G]
    o = so[..., 1].permute(0, 2, 1).reshape(nb * 16, -1)
    gid = torch.arange(Kc * 64, device=w.device) // mw.group              # [Kp64]
    real = codes.float() * s[:, gid] + o[:, gid]                          # [N, Kp64]
    return real[:, :mw.in_features].to(dtype)


# ---- build and load -------------------------------------------------------------------------------

_LIB: dict[str, object] = {}


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build(arch: str) -> ctypes.CDLL:
    """Compile csrc/w4a16.cu for `arch` (e.g. '90') into the cache and load it."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    dll = build_library(f"w4a16-sm{arch}", _SRC, lambda out: [
        nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", str(out), str(_SRC)])
    dll.lowbit_w4a16.restype = ctypes.c_int
    dll.lowbit_w4a16.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    dll.lowbit_w4a16_workspace.restype = ctypes.c_longlong
    dll.lowbit_w4a16_workspace.argtypes = [ctypes.c_int] * 3
    return dll


def available(device=None) -> bool:
    """Whether the CUDA kernel is built (or can be) for this GPU; the first call compiles it (~30 s)."""
    if os.environ.get("LOWBIT_MARLIN", "1") == "0" or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    arch = f"{major}{minor}"
    if arch not in _LIB:
        try:
            _LIB[arch] = _build(arch)
        except (RuntimeError, OSError) as e:
            warnings.warn(f"lowbit: the W4A16 CUDA kernel is unavailable ({e}); using the Triton kernel",
                          stacklevel=2)
            _LIB[arch] = None
    return _LIB[arch] is not None


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_split(M: int, N: int, Kc: int) -> int:
    """K split across blocks, fitted to the H200 sweep (benchmarks/wq_sweep.py, six Llama-3 8B/70B shapes,
    splits 1-16): the largest power of two that keeps the blocks within ~2 per SM (M <= 16; ~1.2 per SM
    for M <= 32, whose kernel fits one block per SM), each block keeping >= 2 stages of 128 k."""
    sms = _sms(torch.cuda.current_device())
    limit = 2 * sms if M <= 16 else 1.2 * sms
    groups, split = -(-N // ROWS_B), 1
    while split < 16 and groups * split * 2 <= limit and Kc // 2 // (split * 2) >= 2:
        split *= 2
    return split


def w4a16_linear(x2: torch.Tensor, mw: MarlinWeight, split: int | None = None) -> torch.Tensor:
    """y [M, N] = x2 [M, K] @ W.T, x2 contiguous fp16/bf16 in the kernel column order (32 rows a launch)."""
    from lowbit.kernels.wq_gemm import _locks
    M, K = x2.shape
    N, Kc = mw.out_features, mw.padded_in // 64
    if K != mw.padded_in:
        x2 = F.pad(x2, (0, mw.padded_in - K))                             # [M, Kp64], zeros read as 0
    major, minor = torch.cuda.get_device_capability(x2.device)
    lib = _LIB[f"{major}{minor}"]
    plan = split is None
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    locks = _locks(x2.device)
    bf16 = int(x2.dtype == torch.bfloat16)
    G = mw.scale_offset.shape[1]
    for a in range(0, M, 32):                                              # 32 rows per launch
        xs, ys = x2[a:a + 32], y[a:a + 32]
        if plan:
            split = plan_split(xs.shape[0], N, Kc)
        ws = torch.empty(max(1, lib.lowbit_w4a16_workspace(xs.shape[0], N, split)), device=x2.device,
                         dtype=torch.float32)
        err = lib.lowbit_w4a16(xs.data_ptr(), mw.qweight.data_ptr(), mw.scale_offset.data_ptr(), ys.data_ptr(),
                               ws.data_ptr(), locks.data_ptr(), xs.shape[0], N, Kc, G, mw.group // 64, split,
                               bf16, stream)
        if err != 0:
            raise RuntimeError(f"lowbit W4A16 CUDA kernel failed (cudaError {err})")
    return y
