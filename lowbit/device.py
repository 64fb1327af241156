"""Which device a run may use: one check shared by the loader, the layer walk and the benchmarks."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def check_device(device: str) -> str:
    """`device` itself, or a one-line LowbitError naming --device when this machine cannot run on it."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__} finds none)")
    return device
