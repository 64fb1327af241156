"""GPU kernels (Triton) behind the CPU reference paths of lowbit.quant and lowbit.engine.

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


@contextlib.contextmanager
def kernels_disabled(disabled: bool = True):
    """Temporarily force the reference paths (or, with False, allow the kernels again)."""
    global _disabled
    old, _disabled = _disabled, disabled
    try:
        yield
    finally:
        _disabled = old
