"""GPU kernels (Triton, CUDA) behind the CPU reference paths of lowbit.quant and lowbit.engine, and CPU
weight-only matmuls for decode (lowbit.kernels.cpu_wq: lowbit's C kernel, PyTorch's where there is no compiler).

Every kernel has a reference in plain PyTorch that stays the oracle (and the path on CPU, or wherever
Triton is missing). Layers ask `use_kernels(x)` before dispatching; tests and benchmarks switch the
kernels off with `kernels_disabled()` to compare both paths on one device, and users with the
environment variable LOWBIT_KERNELS=0.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
_disabled = os.environ.get("LOWBIT_KERNELS", "1") == "0"


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for a tensor: CUDA, Triton importable, not disabled."""
    return x.is_cuda and HAS_TRITON and not _disabled


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the CPU weight-only kernels (lowbit.kernels.cpu_wq) should run: a float32 CPU tensor that needs
    no gradient (the kernels have no backward), not disabled."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not _disabled
            and not (x.requires_grad and torch.is_grad_enabled()))


@contextlib.contextmanager
def kernels_disabled(disabled: bool = True):
    """Temporarily force the reference paths (or, with False, allow the kernels again)."""
    global _disabled
    old, _disabled = _disabled, disabled
    try:
        yield
    finally:
        _disabled = old
