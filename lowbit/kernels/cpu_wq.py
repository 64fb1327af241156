"""CPU matmuls for weight-only (WkA16) layers without dequantizing the weight: PyTorch's own CPU kernels.

Two kernels ship with PyTorch (ATen, vectorised, threaded over the output features):
  int8   torch._weight_int8pack_mm(x [M, K], w int8 [N, K], s [N])           y = x @ (s * w).T
         -> 8-bit symmetric grids with one scale per output channel (or per tensor).
  int4   torch._weight_int4pack_mm_for_cpu(x [M, K], packed, g, sz [K/g, N, 2])
         with w[n, k] = (c[n, k] - 8) * sz[k // g, n, 0] + sz[k // g, n, 1], codes c in [0, 15]
         packed by torch._convert_weight_to_int4pack_for_cpu(c int32 [N, K]); g in 32/64/128/256.
         -> every grid of at most 4 bits whose groups are unions of kernel groups, rewritten exactly:
            symmetric   real = s*q              c = q + 8, zero' = 0
            int zero    real = s*(q - z)        c = q,     zero' = s*(8 - z)
            float zero  real = s*q + z          c = q,     zero' = z + 8*s
Both take float32 activations here (the kernels want x, scales and zeros in one dtype; lowbit's
scales are fp16/fp32, so fp32 keeps them exact). Measured on this repo's 2-core AVX-512 machine (1 thread,
1536x576, M=1): fp32 F.linear 0.29 ms; these kernels in fp32 0.9 ms (int8) / 2.6 ms (int4), against 11 / 4.1 ms
for the dequantize path they replace; in bf16 they take 0.05 / 0.14 ms (ATen vectorises only bf16), but bf16
scales and zeros would change the stored weights, so that is left as an explicit choice for later. Anything else (5..7 bits, 8-bit grouped or
asymmetric, act-order g_idx that breaks runs of 32 columns, K not a multiple of 32) returns None: the caller keeps the
dequantize reference path. The packed form is derived state, never written to a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest first


@dataclass
class CpuPacked:
    """A weight in one CPU kernel's layout. kind "int8": weight int8 [N, K], scales fp32 [N];
    kind "int4": weight uint8 [N, K/2] (the kernel's packing), scales fp32 [K/g, N, 2] (scale, zero')."""
    kind: str
    weight: torch.Tensor
    scales: torch.Tensor
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales))


def has_cpu_kernels() -> bool:
    """Whether this PyTorch build has both CPU weight-only kernels."""
    return hasattr(torch, "_weight_int8pack_mm") and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def _column_groups(layer) -> torch.Tensor:
    """The scale/zero column each input column uses: [K] (g_idx when stored, else j // group_size)."""
    k, gs = layer.in_features, layer.spec.group_size
    if layer.g_idx is not None:
        return layer.g_idx.long().cpu()
    return torch.zeros(k, dtype=torch.long) if gs <= 0 else torch.arange(k) // gs


def _kernel_group(cols: torch.Tensor) -> int:
    """The largest kernel group size g such that every run of g columns shares one lowbit group (0: none)."""
    k = cols.numel()
    for g in KERNEL_GROUPS:
        if k % g == 0 and bool((cols.view(-1, g) == cols.view(-1, g)[:, :1]).all()):
            return g
    return 0


def cpu_pack(layer) -> CpuPacked | None:
    """A WeightOnlyLinear's weight in a CPU kernel's layout, or None if neither kernel takes its grid."""
    spec = layer.spec
    if not has_cpu_kernels():
        return None
    n = layer.out_features
    scale = layer.scale.float()                                                    # [rows, G]
    if spec.bits == 8 and spec.symmetric and spec.group_size <= 0:
        s = scale.reshape(-1).expand(n).contiguous()                               # [N]
        return CpuPacked("int8", layer.codes().contiguous(), s)
    if spec.bits > 4:
        return None
    cols = _column_groups(layer)                                                   # [K]
    g = _kernel_group(cols)
    if g == 0:
        return None
    first = cols[::g].to(scale.device)                                             # [K/g] lowbit group per kernel group
    s = scale.expand(n, scale.shape[1])[:, first]                                  # [N, K/g]
    q = layer.codes().to(torch.int32)                                              # [N, K]
    if spec.symmetric:
        c, zk = q + 8, torch.zeros_like(s)
    else:
        z = layer.zero.float().expand(n, scale.shape[1])[:, first]                 # [N, K/g]
        c = q
        # float64 for the offsets: (8 - z)*s is then exact, z + 8*s rounded once to fp32.
        zk = (z.double() + 8 * s.double()) if spec.float_zero else (8 - z.double()) * s.double()
    packed = torch._convert_weight_to_int4pack_for_cpu(c.contiguous(), 2)          # uint8 [N, K/2]
    sz = torch.stack([s, zk.float()], dim=-1).transpose(0, 1).contiguous()         # [K/g, N, 2]
    return CpuPacked("int4", packed, sz, g)


def cpu_linear(x: torch.Tensor, packed: CpuPacked, out_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float32 -> x @ W.T (+ bias) [..., N] through the packed weight's kernel."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()                                  # [M, K]
    if packed.kind == "int8":
        y = torch._weight_int8pack_mm(x2, packed.weight, packed.scales)            # [M, N]
    else:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed.weight, packed.group_size, packed.scales)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
