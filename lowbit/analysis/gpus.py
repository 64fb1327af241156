"""Peak specs of a few accelerators, for roofline bounds.

All numbers are *dense* peaks (no 2:4 structured sparsity) from the vendors' public
datasheets; units are SI: bytes/s and FLOP/s (1 TB/s = 1e12 B/s, 1 TFLOP/s = 1e12 FLOP/s).
Achievable throughput is typically 60-80 % of these, so bounds built on them are optimistic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lowbit.errors import LowbitError

T = 1e12
G = 1e9


@dataclass(frozen=True)
class GPUSpec:
    """Peak numbers of one accelerator. A field is None where the chip has no such unit."""

    name: str
    mem_bandwidth: float          # bytes/s, peak DRAM/HBM bandwidth
    bf16_flops: float             # FLOP/s, dense bf16/fp16 tensor-core peak
    fp32_flops: float             # FLOP/s, plain fp32 (non-tensor-core) peak
    int8_ops: float | None        # OP/s, dense int8 tensor-core peak
    fp8_flops: float | None       # FLOP/s, dense fp8 tensor-core peak (Hopper/Ada and later)
    memory_bytes: float           # bytes of device memory
    source: str = ""              # where the numbers come from

    def peak(self, compute: str = "bf16") -> float:
        """Peak FLOP/s (or OP/s) for a compute dtype: bf16, fp16, fp32, int8 or fp8."""
        compute = compute.lower()
        value = {"bf16": self.bf16_flops, "fp16": self.bf16_flops, "fp32": self.fp32_flops,
                 "int8": self.int8_ops, "fp8": self.fp8_flops}.get(compute, -1.0)
        if value == -1.0:
            raise LowbitError(f"compute: unknown compute dtype {compute!r} (known: bf16, fp16, fp32, int8, fp8)")
        if value is None:
            raise LowbitError(f"compute: {self.name} has no {compute} units")
        return value

    def ridge_point(self, compute: str = "bf16") -> float:
        """FLOP/byte at which the roofline turns from memory- to compute-bound."""
        return self.peak(compute) / self.mem_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# One row per accelerator: (name, bandwidth B/s, dense bf16/fp16, fp32, int8, fp8 FLOP/s, memory bytes, source).
# Datasheets quote tensor-core peaks *with 2:4 sparsity*; the dense peak is half of that.
_ROWS = {
    # H100 SXM5: 80 GB HBM3 at 3.35 TB/s; BF16 1,979 / FP8 3,958 / INT8 3,958 sparse; FP32 67 TFLOPS.
    "h100": ("NVIDIA H100 SXM5 80GB", 3.35 * T, 989.4 * T, 67 * T, 1979 * T, 1979 * T, 80 * G,
             "NVIDIA H100 Tensor Core GPU datasheet (SXM5), dense = sparse / 2"),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s; the H100's Hopper compute.
    "h200": ("NVIDIA H200 SXM 141GB", 4.8 * T, 989.4 * T, 67 * T, 1979 * T, 1979 * T, 141 * G,
             "NVIDIA H200 Tensor Core GPU datasheet (SXM), dense = sparse / 2"),
    # A100 80GB SXM: HBM2e 2,039 GB/s; BF16 312 / INT8 624 dense; FP32 19.5 TFLOPS; no FP8 units (Ampere).
    "a100": ("NVIDIA A100 SXM4 80GB", 2.039 * T, 312 * T, 19.5 * T, 624 * T, None, 80 * G,
             "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    # L4: 24 GB GDDR6 at 300 GB/s; FP16/BF16 242 / FP8 485 / INT8 485 sparse; FP32 30.3 TFLOPS.
    "l4": ("NVIDIA L4 24GB", 300 * G, 121 * T, 30.3 * T, 242.5 * T, 242.5 * T, 24 * G,
           "NVIDIA L4 Tensor Core GPU datasheet, dense = sparse / 2"),
    # An ORDER-OF-MAGNITUDE PLACEHOLDER, not a datasheet: a many-core DDR5 server socket (~100 GB/s) doing
    # fp32 SIMD FMAs on all cores (~1.5 TFLOP/s); bf16 and int8 no faster without AMX/VNNI-style units.
    "cpu": ("generic CPU (placeholder)", 100 * G, 1.5 * T, 1.5 * T, 1.5 * T, None, 64 * G,
            "order-of-magnitude placeholder"),
}
GPUS: dict[str, GPUSpec] = {key: GPUSpec(*row) for key, row in _ROWS.items()}


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """Look up a GPUSpec by key (case-insensitive); a GPUSpec passes through unchanged."""
    if isinstance(name, GPUSpec):
        return name
    key = str(name).lower().strip()
    if key not in GPUS:
        raise LowbitError(f"gpu: unknown GPU {name!r} (known: {', '.join(GPUS)})")
    return GPUS[key]
