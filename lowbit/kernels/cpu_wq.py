"""CPU matmuls for weight-only (WkA16) layers that never dequantize the weight: decode-sized inputs read
each packed byte once, which is what a memory-bound decode step needs.

Two backends, fp32 activations in both:
  "c"     lowbit's own kernel (csrc/cpu_wq.c), compiled with the system C compiler at first use
          (-O3 -march=native -fopenmp, cached; AVX-512 / AVX2 / portable paths). Every grid of <= 8 bits
          whose groups are runs of 32 columns maps, rewritten exactly as W = s * c + b per kernel group:
            <= 4 bits (unsigned nibbles c)   symmetric  c = q + 8, b = -8 s (not stored);  integer zero  c = q, b = -z s;
                                             float zero c = q,     b = z
            5..8 bits (int8 c)               symmetric  c = q,     no b;      integer zero  c = q - o, b = (o - z) s;
                                             float zero c = q - o, b = z + o s   (o = 128 at 8 bits, else 0)
          With fp16 scales every b and s * c is exact in fp32, so the kernel's weight equals the reference's.
  "aten"  PyTorch's _weight_int8pack_mm (8-bit symmetric per channel) and _weight_int4pack_mm_for_cpu
          (<= 4 bits, groups 32..256) when no C compiler is there. In fp32 they are scalar code (ATen
          vectorises them for bf16 only): on this repo's 2-core AVX-512 machine, 1536x576 at M=1 and 1 thread,
          0.5 / 1.3 ms against 0.12 ms for fp32 F.linear (benchmarks/results/cpu_profile.md).
Anything else (K not a multiple of 32, act-order g_idx that splits runs of 32 columns) returns None: the
caller keeps the dequantize reference path. The packed form is derived state, never written to a checkpoint.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.kernels.build import build_library

ATEN_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest first
_SRC = Path(__file__).parent / "csrc" / "cpu_wq.c"


@dataclass
class CpuPacked:
    """A weight in one CPU kernel's layout.
    kind "q4" / "q8" (backend c): weight uint8 [N, K/2] / int8 [N, K], scales fp32 [N, K/G], offsets fp32
        [N, K/G] (None: b = -centre * s); kind "int8" (aten): weight int8 [N, K], scales fp32 [N]; kind "int4" (aten):
        weight uint8 [N, K/2] (the kernel's packing), scales fp32 [K/G, N, 2] (scale, zero')."""
    kind: str
    weight: torch.Tensor
    scales: torch.Tensor
    group_size: int = 0
    offsets: torch.Tensor | None = None
    centre: float = 0.0  # backend c, no offsets: b = -centre * s

    @property
    def max_rows(self) -> int:
        """Input rows up to which this kernel beats dequantize + GEMM (benchmarks/results/cpu_profile.md): lowbit's
        kernel at every size measured (up to 128 rows: 2.4 against 6.1 ms for 1536x576 4-bit on 2 threads);
        PyTorch's fp32 kernels at decode sizes only."""
        return 1 << 30 if self.kind in ("q4", "q8") else 8

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.offsets) if t is not None)


def _cpu_tag() -> str:
    """The CPU's identity (its feature flags): a -march=native build must not be loaded on another CPU."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def build_c_kernel(march: str = "native") -> ctypes.CDLL:
    """Compile csrc/cpu_wq.c for `march` (gcc's -march; "native": this CPU) into the cache and load it."""
    cc, tag = os.environ.get("CC", "cc"), _cpu_tag()
    dll = build_library(f"cpu_wq-{march}", _SRC, lambda out: [
        cc, "-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared", f"-DLOWBIT_CPU_TAG={tag}",
        "-o", str(out), str(_SRC), "-lm"])
    dll.lowbit_cpu_wq.restype = ctypes.c_int
    dll.lowbit_cpu_wq.argtypes = ([ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                                  + [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int])
    return dll


@functools.lru_cache(maxsize=None)
def c_kernel() -> ctypes.CDLL | None:
    """lowbit's C kernel for this CPU, built at first use; None (with one warning) where it cannot be built,
    or with LOWBIT_CPU_KERNEL=aten."""
    if os.environ.get("LOWBIT_CPU_KERNEL", "c") == "aten":
        return None
    try:
        return build_c_kernel()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"lowbit: the C CPU kernel is unavailable ({str(e).splitlines()[0][:200]}); "
                      "using PyTorch's CPU kernels", stacklevel=2)
        return None


def has_aten_kernels() -> bool:
    return hasattr(torch, "_weight_int8pack_mm") and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def _column_groups(layer) -> torch.Tensor:
    """The scale/zero column each input column uses: [K] (g_idx when stored, else j // group_size)."""
    k, gs = layer.in_features, layer.spec.group_size
    if layer.g_idx is not None:
        return layer.g_idx.long().cpu()
    return torch.zeros(k, dtype=torch.long) if gs <= 0 else torch.arange(k) // gs


def _runs_share_group(cols: torch.Tensor, g: int) -> bool:
    k = cols.numel()
    return k % g == 0 and bool((cols.view(-1, g) == cols.view(-1, g)[:, :1]).all())


def _per_kernel_group(layer, cols: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero [N, K/g] fp32 of each kernel group of g columns (zero None when symmetric)."""
    n = layer.out_features
    scale = layer.scale.float()                                                    # [rows, G]
    first = cols[::g].to(scale.device)                                             # [K/g] lowbit group per kernel group
    s = scale.expand(n, scale.shape[1])[:, first]                                  # [N, K/g]
    z = None if layer.spec.symmetric else layer.zero.float().expand(n, scale.shape[1])[:, first]
    return s, z


def _pack_c(layer) -> CpuPacked | None:
    spec, k = layer.spec, layer.in_features
    if spec.bits > 8 or k % 32:
        return None
    cols = _column_groups(layer)
    if layer.g_idx is None and spec.group_size <= 0:
        g = k
    else:  # the lowbit group, or the largest power-of-two fraction of it (>= 32) that tiles K
        g = next((c for c in (spec.group_size >> i for i in range(8)) if c >= 32 and c % 32 == 0
                  and _runs_share_group(cols, c)), 0)
        if g == 0 and _runs_share_group(cols, 32):
            g = 32
    if g == 0:
        return None
    s, z = _per_kernel_group(layer, cols, g)
    q = layer.codes().to(torch.int32)                                              # [N, K]
    if spec.bits <= 4:
        o = 8 if spec.symmetric else 0
        c = q + o
        halves = c.view(-1, k // 32, 2, 16).to(torch.uint8)                        # [N, K/32, 2, 16]
        w = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, k // 2)        # [N, K/2]: low j0+t, high j0+16+t
        if spec.symmetric:  # b = -8 s, applied by the kernel from s (centre)
            return CpuPacked("q4", w.contiguous(), s.contiguous(), g, None, centre=8.0)
        b = z.double() if spec.float_zero else -z.double() * s.double()
        return CpuPacked("q4", w.contiguous(), s.contiguous(), g, b.float().contiguous())
    o = 128 if (spec.bits == 8 and not spec.symmetric) else 0
    c = (q - o).to(torch.int8)                                                     # [N, K]
    if spec.symmetric:
        b = None
    else:  # float64, then one rounding to fp32 (exact for fp16 scales and integer zeros)
        b = (z.double() + o * s.double()) if spec.float_zero else (o - z.double()) * s.double()
        b = b.float().contiguous()
    return CpuPacked("q8", c.contiguous(), s.contiguous(), g, b)


def _pack_aten(layer) -> CpuPacked | None:
    spec = layer.spec
    if not has_aten_kernels():
        return None
    n = layer.out_features
    if spec.bits == 8 and spec.symmetric and spec.group_size <= 0:
        s = layer.scale.float().reshape(-1).expand(n).contiguous()                 # [N]
        return CpuPacked("int8", layer.codes().contiguous(), s)
    if spec.bits > 4:
        return None
    cols = _column_groups(layer)                                                   # [K]
    g = next((c for c in ATEN_GROUPS if _runs_share_group(cols, c)), 0)
    if g == 0:
        return None
    s, z = _per_kernel_group(layer, cols, g)                                       # [N, K/g]
    q = layer.codes().to(torch.int32)                                              # [N, K]
    if spec.symmetric:   # w = (c - 8) * s + zero'
        c, zk = q + 8, torch.zeros_like(s)
    else:  # float64 for the offsets: (8 - z)*s is then exact, z + 8*s rounded once to fp32.
        c = q
        zk = (z.double() + 8 * s.double()) if spec.float_zero else (8 - z.double()) * s.double()
    packed = torch._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2)          # uint8 [N, K/2]
    sz = torch.stack([s, zk.float()], dim=-1).transpose(0, 1).contiguous()         # [K/g, N, 2]
    return CpuPacked("int4", packed, sz, g)


_preferred: str | None = None


def current_backend() -> str:
    """The backend cpu_pack uses by default: "c" where lowbit's kernel builds, else "aten" (or what
    `preferred_backend` set)."""
    return _preferred or ("c" if c_kernel() is not None else "aten")


@contextlib.contextmanager
def preferred_backend(name: str):
    """Pack new CPU weights with backend `name` ("c" / "aten") inside the block (benchmarks compare them)."""
    global _preferred
    old, _preferred = _preferred, name
    try:
        yield
    finally:
        _preferred = old


def cpu_pack(layer, backend: str | None = None) -> CpuPacked | None:
    """A WeightOnlyLinear's weight in a CPU kernel's layout (backend "c", "aten", or None: current_backend()),
    or None if no kernel takes its grid."""
    backend = backend or current_backend()
    if backend == "c":
        return _pack_c(layer) if c_kernel() is not None else None
    return _pack_aten(layer)


def cpu_linear(x: torch.Tensor, packed: CpuPacked, out_features: int,
               bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [..., K] float32 -> x @ W.T (+ bias) [..., N] through the packed weight's kernel (lib: another build
    of the C kernel, build_c_kernel's, for tests of its instruction-set paths)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                                  # [M, K]
    if packed.kind in ("q4", "q8"):
        m, k = x2.shape
        y = torch.empty(m, out_features, dtype=torch.float32)                     # [M, N]
        b = packed.offsets
        (lib or c_kernel()).lowbit_cpu_wq(4 if packed.kind == "q4" else 8, x2.data_ptr(), m, k, packed.weight.data_ptr(),
                                 packed.scales.data_ptr(), None if b is None else b.data_ptr(), packed.centre, out_features,
                                 packed.group_size, y.data_ptr(), torch.get_num_threads())
    elif packed.kind == "int8":
        y = torch._weight_int8pack_mm(x2, packed.weight, packed.scales)            # [M, N]
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed.weight, packed.group_size, packed.scales)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
