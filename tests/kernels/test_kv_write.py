"""The one-launch K/V store against the pools' indexing reference: under Triton's interpreter (CPU, when it
works here) and on the GPU (marked); on CPU tensors the cache keeps the reference path (in CI)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import triton_interpreter_ok
from lowbit.engine.paged_cache import PagedKVCache
from lowbit.models.shapes import shape_config

CHECK = textwrap.dedent("""
    import torch
    from lowbit.kernels.kv_write import kv_write
    dev = {dev!r}
    for dtype in {dtypes}:
        for nb, n_kv, bs, hd, N in ((6, 2, 16, 64, 5), (40, 8, 16, 128, 33), (9, 3, 8, 96, 9)):
            g = torch.Generator().manual_seed(N)
            kp = torch.randn(nb, n_kv, bs, hd, generator=g).to(dev, dtype)
            vp = torch.randn(nb, n_kv, bs, hd, generator=g).to(dev, dtype)
            slots = torch.randperm(nb * bs, generator=g)[:N].to(dev)            # distinct slots
            blk, off = slots // bs, slots % bs
            k = torch.randn(N, 1, n_kv, hd, generator=g).to(dev, dtype).transpose(1, 2)[:, :, 0]  # strided
            v = torch.randn(N, n_kv, hd, generator=g).to(dev, dtype)
            rk, rv = kp.clone(), vp.clone()
            rk[blk, :, off], rv[blk, :, off] = k, v
            kv_write(kp, vp, blk, off, k, v)
            assert torch.equal(kp, rk) and torch.equal(vp, rv), (dtype, nb, N)
    print("ok")
""")


def test_cpu_cache_write_is_the_reference():
    cfg = shape_config("smollm2")
    kv = PagedKVCache(cfg, 4, 16, torch.float32)
    k = torch.randn(3, cfg.num_kv_heads, cfg.head_dim)
    kv.write(0, [5, 17, 40], k, -k)
    assert torch.equal(kv.k[0][1, :, 1], k[1]) and torch.equal(kv.v[0][2, :, 8], -k[2])


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs a working Triton CPU interpreter")
def test_kv_write_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cpu", dtypes="(torch.float32,)")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.gpu
def test_kv_write_on_gpu():
    r = subprocess.run([sys.executable, "-c", CHECK.format(dev="cuda", dtypes="(torch.bfloat16, torch.float16)")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
