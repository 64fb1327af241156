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


GPUS: dict[str, GPUSpec] = {
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s; BF16/FP16 tensor 1,979 TFLOPS *with
    # sparsity* -> 989.4 dense; FP8 3,958 sparse -> 1,979 dense; INT8 3,958 TOPS sparse -> 1,979 dense;
    # FP32 67 TFLOPS.
    "h100": GPUSpec("NVIDIA H100 SXM5 80GB", mem_bandwidth=3.35 * T, bf16_flops=989.4 * T,
                    fp32_flops=67 * T, int8_ops=1979 * T, fp8_flops=1979 * T, memory_bytes=80 * G,
                    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5), dense = sparse / 2"),
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s; same Hopper compute as H100 SXM
    # (BF16 1,979 / FP8 3,958 / INT8 3,958 sparse -> halves dense; FP32 67 TFLOPS).
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", mem_bandwidth=4.8 * T, bf16_flops=989.4 * T,
                    fp32_flops=67 * T, int8_ops=1979 * T, fp8_flops=1979 * T, memory_bytes=141 * G,
                    source="NVIDIA H200 Tensor Core GPU datasheet (SXM), dense = sparse / 2"),
    # NVIDIA A100 80GB SXM datasheet: HBM2e 2,039 GB/s; BF16/FP16 tensor 312 TFLOPS dense
    # (624 sparse); INT8 624 TOPS dense (1,248 sparse); FP32 19.5 TFLOPS; no FP8 units (Ampere).
    "a100": GPUSpec("NVIDIA A100 SXM4 80GB", mem_bandwidth=2.039 * T, bf16_flops=312 * T,
                    fp32_flops=19.5 * T, int8_ops=624 * T, fp8_flops=None, memory_bytes=80 * G,
                    source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s; FP16/BF16 tensor 242 TFLOPS *with sparsity*
    # -> 121 dense; FP8 485 sparse -> 242.5 dense; INT8 485 TOPS sparse -> 242.5 dense; FP32 30.3 TFLOPS.
    "l4": GPUSpec("NVIDIA L4 24GB", mem_bandwidth=300 * G, bf16_flops=121 * T,
                  fp32_flops=30.3 * T, int8_ops=242.5 * T, fp8_flops=242.5 * T, memory_bytes=24 * G,
                  source="NVIDIA L4 Tensor Core GPU datasheet, dense = sparse / 2"),
    # Generic CPU: an ORDER-OF-MAGNITUDE PLACEHOLDER, not a datasheet value. Roughly a
    # many-core server socket with DDR5 (~100 GB/s) doing fp32 SIMD FMAs on all cores (~1.5 TFLOP/s);
    # bf16 and int8 are set equal to fp32 since, without AMX/VNNI-style units, they are not faster.
    "cpu": GPUSpec("generic CPU (placeholder)", mem_bandwidth=100 * G, bf16_flops=1.5 * T,
                   fp32_flops=1.5 * T, int8_ops=1.5 * T, fp8_flops=None, memory_bytes=64 * G,
                   source="order-of-magnitude placeholder"),
}


def get_gpu(name: str | GPUSpec) -> GPUSpec:
    """Look up a GPUSpec by key (case-insensitive); a GPUSpec passes through unchanged."""
    if isinstance(name, GPUSpec):
        return name
    key = str(name).lower().strip()
    if key not in GPUS:
        raise LowbitError(f"gpu: unknown GPU {name!r} (known: {', '.join(GPUS)})")
    return GPUS[key]
