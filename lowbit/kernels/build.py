"""Compile a kernel source at first use into lowbit's cache and load it with ctypes (no torch headers,
so a build takes a second for C and ~30 s for CUDA, not minutes).

The library's name carries a hash of the source and the compiler command, so an edited source or another
machine's flags never reuse a stale build; the compiler writes into a temporary directory inside the cache
and the result is moved into place atomically, so a concurrent or interrupted build never leaves a half
library behind. ~/.cache/lowbit/kernels, or $LOWBIT_CACHE/kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "kernels"


def build_library(name: str, src: Path, command: Callable[[Path], list[str]]) -> ctypes.CDLL:
    """Build `src` with `command(out_path)` (the full compiler argv) unless cached; load it. Raises
    RuntimeError with the compiler's last output lines when the build fails."""
    argv_key = " ".join(command(Path("OUT")))
    tag = hashlib.sha256(src.read_bytes() + argv_key.encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            argv = command(out)
            try:
                r = subprocess.run(argv, capture_output=True, text=True)
            except OSError as e:  # the compiler itself is missing
                raise RuntimeError(str(e)) from None
            if r.returncode != 0:
                raise RuntimeError(f"{argv[0]} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
