"""Triton paged decode attention against the PyTorch reference (the oracle), in float32.

Three tiers: the dispatcher on CPU (no Triton needed), the kernel under the Triton CPU interpreter on tiny
shapes (in a subprocess, so TRITON_INTERPRET=1 never leaks into other tests), and random shapes on a GPU.
Caches are honest: block tables are random permutations of the pool, padded with -1, and every slot no
sequence owns holds large junk, so reading one would swamp the softmax.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from helpers import triton_interpreter_ok
except ImportError:  # this file run as a script inside the interpreter subprocess
    def triton_interpreter_ok() -> bool:
        return True
import torch

from lowbit.kernels.paged_attention_ref import paged_attention
from lowbit.errors import LowbitError
from lowbit.kernels import kernels_disabled
from lowbit.kernels.paged_attention import auto_num_splits, decode_attention, paged_decode_attention
from lowbit.layers.kv_quant import KVQuant

ROOT = Path(__file__).resolve().parents[2]
JUNK = 30.0


def make_case(seed, lens, H, n_kv, hd, bs, dtype=torch.float32, kv="float", device="cpu", spare=3):
    """Random decode inputs: dict(q [B,H,hd], k, v pools, ks, vs scales or None, bt [B,MB] int32, ctx [B])."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    nblk = [-(-L // bs) for L in lens]
    num_blocks = sum(nblk) + spare
    k = torch.randn(num_blocks, n_kv, bs, hd, generator=g)           # [num_blocks, n_kv, bs, hd]
    v = torch.randn(num_blocks, n_kv, bs, hd, generator=g)
    owned = torch.zeros(num_blocks, bs, dtype=torch.bool)              # slots some sequence attends to
    perm = torch.randperm(num_blocks, generator=g).tolist()
    bt = torch.full((B, max(nblk) + 1), -1, dtype=torch.int32)         # one -1 column even for the longest
    for b, L in enumerate(lens):
        table, perm = perm[:nblk[b]], perm[nblk[b]:]
        bt[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
        pos = torch.arange(L)                                           # [L] token positions
        owned[bt[b, pos // bs].long(), pos % bs] = True
    junk = (~owned)[:, None, :, None]                                   # [num_blocks, 1, bs, 1]
    k, v = torch.where(junk, k * JUNK, k), torch.where(junk, v * JUNK, v)
    case = dict(q=torch.randn(B, H, hd, generator=g).to(dtype), bt=bt, ctx=torch.tensor(lens, dtype=torch.int32))
    if kv == "float":
        case.update(k=k.to(dtype), v=v.to(dtype), ks=None, vs=None)
    else:
        quant = KVQuant(kv)
        (kc, ks), (vc, vs) = quant.quantize(k), quant.quantize(v)       # codes [..., hd], scales [..., 1]
        case.update(k=kc, v=vc, ks=ks, vs=vs)
    return {name: (t.to(device) if t is not None else None) for name, t in case.items()}


def oracle(c):
    """float32 reference over the whole (dequantized) pool: [B, H, hd]."""
    k, v = c["k"].float(), c["v"].float()
    if c["ks"] is not None:
        k, v = k * c["ks"], v * c["vs"]
    return paged_attention(c["q"].float()[:, :, None], k, v, c["bt"], c["ctx"])[:, :, 0]


def wrong_table(c):
    """Every real entry moved to the next block of the pool (still in range, so safe to read on a GPU)."""
    bt = c["bt"]
    return dict(c, bt=torch.where(bt >= 0, (bt + 1) % c["k"].shape[0], bt))


def run_kernel(c, **kw):
    return paged_decode_attention(c["q"], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"], v_scale=c["vs"], **kw)


# ----------------------------------------------------------------------------- CPU (no Triton needed)

@pytest.mark.parametrize("kv", ["float", "int8", "fp8"])
@pytest.mark.parametrize("H,n_kv", [(4, 4), (6, 2), (8, 2)])
def test_dispatcher_cpu_matches_reference(kv, H, n_kv):
    c = make_case(H + n_kv, [1, 16, 37], H, n_kv, hd=32, bs=16, kv=kv)
    out = decode_attention(c["q"], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"], v_scale=c["vs"])
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    torch.testing.assert_close(out, oracle(c), atol=1e-5, rtol=1e-5)
    # The junk is real: reading through the wrong table gives a very different answer.
    assert (oracle(wrong_table(c)) - oracle(c)).abs().max() > 0.1


def test_dispatcher_rejects_bad_inputs():
    c = make_case(0, [5], 4, 2, hd=16, bs=16, kv="int8")
    with pytest.raises(LowbitError, match="k_scale"):
        decode_attention(c["q"], c["k"], c["v"], c["bt"], c["ctx"])
    with pytest.raises(LowbitError, match="multiple of n_kv"):
        decode_attention(c["q"][:, :3], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"], v_scale=c["vs"])
    with pytest.raises(LowbitError, match=r"q \[B, H, hd\]"):
        decode_attention(c["q"][:, :, None], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"], v_scale=c["vs"])


def test_auto_num_splits():
    assert auto_num_splits(32, 8, 8192, 132) == 1           # 256 programs fill 132 SMs
    assert auto_num_splits(1, 8, 8192, 132) == 32           # ~2 programs per SM, 256 tokens each
    assert auto_num_splits(1, 8, 300, 132) == 1             # too short to be worth a merge
    assert auto_num_splits(1, 1, 1 << 20, 132) == 64        # capped
    assert auto_num_splits(4, 2, 1024, 132) == 4            # capped by the length


# ----------------------------------------------------------------------------- Triton CPU interpreter
# (bf16 is left to the GPU tests: the 3.6 interpreter computes tl.dot on bf16 wrongly.)

INTERP_CASES = [  # (lens, H, n_kv, hd, bs, dtype, kv, num_splits, config)
    ([1, 17, 40], 4, 4, 64, 16, torch.float32, "float", 1, None),           # rep 1
    ([1, 17, 40], 4, 4, 64, 16, torch.float32, "float", 3, None),
    ([33, 5], 6, 2, 32, 16, torch.float16, "float", 4, None),               # rep 3, empty splits
    ([70, 1, 16], 8, 2, 64, 32, torch.float16, "int8", 2, None),            # rep 4, block 32
    ([100, 31], 8, 2, 64, 16, torch.float32, "fp8", 3, (32, 4, 1)),         # 2 blocks per tile
    ([45, 64], 8, 2, 64, 32, torch.float16, "fp8", 2, (16, 4, 1)),          # 2 tiles per block
    ([20, 9], 4, 2, 48, 16, torch.float32, "int8", 1, None),                # head_dim padded 48 -> 64
    ([600], 4, 1, 32, 16, torch.float16, "float", None, None),              # auto: 2 splits
    ([50, 3], 32, 1, 32, 16, torch.float16, "int8", 2, None),               # rep 32: no padding rows
    ([129, 2], 6, 3, 128, 16, torch.float32, "fp8", 5, (64, 4, 1)),         # hd 128, rep 2
]


def _interpret_main() -> int:
    """Run INTERP_CASES (TRITON_INTERPRET=1 must be set before triton is imported); 0 if all pass."""
    failed = 0
    for i, (lens, H, n_kv, hd, bs, dtype, kv, splits, config) in enumerate(INTERP_CASES):
        c = make_case(100 + i, lens, H, n_kv, hd, bs, dtype, kv)
        out = run_kernel(c, num_splits=splits, config=config)
        err = (out.float() - oracle(c)).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 5e-3
        ok = out.dtype == dtype and out.shape == c["q"].shape and err <= tol
        failed += not ok
        print(f"case {i}: lens={lens} H={H} n_kv={n_kv} hd={hd} bs={bs} {dtype} {kv} splits={splits} "
              f"config={config}: max err {err:.2e} {'ok' if ok else 'FAIL'}")
    return int(failed > 0)


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs a working Triton CPU interpreter")
def test_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__, "--interpret"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") == len(INTERP_CASES), r.stdout


# ----------------------------------------------------------------------------- GPU

def _random_case(seed, dtype, kv, hd, device="cuda"):
    """B 1..33, contexts 1..3000, n_kv 1/2/8, rep 1/4, block 16/32, drawn from seed."""
    g = torch.Generator().manual_seed(seed)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    B = int(torch.randint(1, 34, (1,), generator=g))
    lens = torch.randint(1, 3001, (B,), generator=g)
    lens[0] = pick([1, 16, 2048, 3000])                                 # edges: one token, whole blocks
    n_kv, rep, bs = pick([1, 2, 8]), pick([1, 4]), pick([16, 32])
    return make_case(seed, lens.tolist(), n_kv * rep, n_kv, hd, bs, dtype, kv, device)


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None])
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("kv", ["float", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_random_shapes(seed, dtype, kv, hd, splits):
    c = _random_case(1000 * seed + hd + 7 * len(kv) + (splits or 0) + (dtype == torch.float16), dtype, kv, hd)
    out = run_kernel(c, num_splits=splits)
    assert out.dtype == dtype and out.shape == c["q"].shape
    torch.testing.assert_close(out.float(), oracle(c), **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["float", "int8", "fp8"])
def test_gpu_fp32_is_tight(kv):
    """fp32 q (and pools) take the exact ("ieee") dot: agreement to float32 rounding, not bf16's."""
    c = make_case(7, [1, 15, 16, 17, 999, 2500], 32, 8, 128, 16, torch.float32, kv, "cuda")
    torch.testing.assert_close(run_kernel(c), oracle(c), **_tol(torch.float32))


@pytest.mark.gpu
def test_gpu_splits_agree_and_wrong_table_fails():
    c = make_case(3, [1, 777, 3000], 32, 8, 128, 16, torch.bfloat16, "int8", "cuda")
    ref = oracle(c)
    for splits in (1, 2, 7, 64, 200):                                 # 200: most splits empty
        torch.testing.assert_close(run_kernel(c, num_splits=splits).float(), ref, **_tol(torch.bfloat16))
    wrong = run_kernel(wrong_table(c))                                 # the test can fail
    assert (wrong.float() - ref).abs().max() > 0.1


@pytest.mark.gpu
def test_gpu_dispatcher_and_strided_inputs():
    c = make_case(5, [5, 300, 1234], 16, 2, 64, 32, torch.bfloat16, "fp8", "cuda")
    ref = oracle(c)
    torch.testing.assert_close(decode_attention(c["q"], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"],
                                                v_scale=c["vs"]).float(), ref, **_tol(torch.bfloat16))
    with kernels_disabled():
        out = decode_attention(c["q"], c["k"], c["v"], c["bt"], c["ctx"], k_scale=c["ks"], v_scale=c["vs"])
    torch.testing.assert_close(out.float(), ref, **_tol(torch.bfloat16))
    # q as a view of a [H, B, hd] tensor and a block table sliced out of a wider one.
    q = c["q"].transpose(0, 1).contiguous().transpose(0, 1)            # [B, H, hd], strides (hd, B*hd, 1)
    wide = torch.full((3, c["bt"].shape[1] + 5), -1, dtype=torch.int32, device="cuda")
    wide[:, 2:2 + c["bt"].shape[1]] = c["bt"]
    out = run_kernel(dict(c, q=q, bt=wide[:, 2:]))
    torch.testing.assert_close(out.float(), ref, **_tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("hd", [80, 256])
def test_gpu_other_head_dims(hd):
    c = make_case(11, [3, 500, 1500], 8, 2, hd, 16, torch.bfloat16, "float", "cuda")
    torch.testing.assert_close(run_kernel(c).float(), oracle(c), **_tol(torch.bfloat16))


if __name__ == "__main__" and "--interpret" in sys.argv:
    sys.exit(_interpret_main())
