"""The physical ceilings every GPU benchmark reports against, measured in the same run.

copy bandwidth: a large device-to-device copy (read + write bytes / time);
matmul rate:    a large bf16 matmul (cuBLAS), 2*M*N*K / time.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

from lowbit.atomic import write_json_atomic, write_text_atomic


def cuda_time(fn, iters: int = 20, warmup: int = 3, graph: bool = True) -> float:
    """Seconds of GPU time per fn() call.

    graph=True (default): `iters` calls captured into one CUDA graph, replayed 5 times, median / iters:
    the kernels' own time without Python and launch overhead, which is how the engine runs a decode
    step. Falls back to per-call event timing (median) if fn cannot be captured, or with graph=False.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    fn()
            times = []
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / iters)
            times.sort()
            return times[len(times) // 2]
        except RuntimeError:
            torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy of nbytes (counting the read and the write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), iters=10, graph=False)
    return 2 * nbytes / t


def matmul_rate(n: int = 8192, dtype=torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul in dtype (cuBLAS)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = cuda_time(lambda: a @ b, iters=10, graph=False)
    return 2 * n ** 3 / t


def ceilings() -> dict:
    """{'copy_GBps', 'bf16_TFLOPs'} measured now."""
    return {"copy_GBps": copy_bandwidth() / 1e9, "bf16_TFLOPs": matmul_rate() / 1e12}


def machine() -> dict:
    """GPU name, torch/triton versions, date and the exact command line."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv)}


def write_results(out: Path, payload: dict, markdown: str) -> None:
    """Write out.json and out.md atomically."""
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown)


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
