"""Batch-1 (M = 1) W4A16 kernel configurations on Llama-3-8B layer shapes against bf16 cuBLAS (GPU).

Times the tensor-core kernel at its planned config and a grid of the GEMV kernel's configs (BLOCK_N x
SPLIT x num_warps), each over layer copies that exceed 2x L2 (weights stream from HBM), as CUDA-graph
replays, with each config's fraction of the copy bandwidth measured in the same run: how far the
kernel is from the memory bound, and which config `plan_gemv` should pick. An ablation shows what
bounds the GEMV: the same loop and loads with the 8-way unpacking replaced by one convert + FMA per
word ("loads only": wrong results, timing only) — the time left when the unpacking ALU work is gone.

    python benchmarks/wq_sweep.py --out benchmarks/results/wq_sweep_h100
"""
from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from ceilings import copy_bandwidth, cuda_time, machine, write_results
from lowbit.kernels.wq_gemm import _block_k, _k_range, plan, plan_gemv, repack, wq_linear
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336), "k/v 1024x4096": (1024, 4096)}
L2_BYTES = 50 << 20


@triton.jit
def _loads_only_kernel(x_ptr, w_ptr, out_ptr, N, Kp, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLIT: tl.constexpr):
    """The GEMV kernel's loop and loads (int32 words [BK/8, BN], x) with one FMA per word, no unpack."""
    BKW: tl.constexpr = BLOCK_K // 8
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    t_start, t_end = _k_range(pid_k, Kp, BLOCK_K, SPLIT)
    acc = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        words = tl.load(w_ptr + (t * BKW + offs_w)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        xj = tl.load(x_ptr + t * BLOCK_K + offs_w * 8).to(tl.float32)
        acc += xj[:, None] * words.to(tl.float32)
    tl.atomic_add(out_ptr + offs_n, tl.sum(acc, axis=0), mask=n_mask)


def loads_only(x, pw, cfg, out):
    grid = (triton.cdiv(pw.out_features, cfg["BLOCK_N"]), cfg["SPLIT"])
    _loads_only_kernel[grid](x, pw.qweight, out, pw.out_features, pw.padded_in, BLOCK_K=128,
                             BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg["SPLIT"], num_warps=cfg["num_warps"])


def timed(fn_per_copy, copies: int, iters: int = 20) -> float:
    def run():
        for i in range(copies):
            fn_per_copy(i)
    return cuda_time(run, iters=iters) / copies


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wq_sweep_h100"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    bw = copy_bandwidth()
    rows = []
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.normal_(0, 0.02)
        pw = repack(WeightOnlyLinear.from_linear(lin, QuantSpec(bits=args.bits, group_size=128), dtype=torch.bfloat16))
        r = max(1, math.ceil(2 * L2_BYTES / pw.nbytes))
        pws = [pw] + [type(pw)(**{**pw.__dict__, "qweight": pw.qweight.clone(), "scale": pw.scale.clone(),
                                  "offset": pw.offset.clone()}) for _ in range(r - 1)]
        rb = max(1, math.ceil(2 * L2_BYTES / (n * k * 2)))
        ws = [lin.weight] + [lin.weight.clone() for _ in range(rb - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = wq_linear(x, pw, config={"GEMV": False, **plan(1, n, pw.padded_in, _block_k(pw.group))})
        t_bf16 = timed(lambda i: F.linear(x, ws[i]), rb)
        rows.append(dict(shape=name, kernel="bf16 cuBLAS", config="", us=t_bf16 * 1e6,
                         frac_copy_bw=n * k * 2 / t_bf16 / bw))
        cfgs = [("tl.dot (plan)", {"GEMV": False, **plan(1, n, pw.padded_in, _block_k(pw.group))})]
        cfgs.append(("gemv (plan_gemv)", plan_gemv(n, pw.padded_in, _block_k(pw.group))))
        for bn, sp, nw in itertools.product(args.block_n, (4, 8, 16, 32), args.warps):
            if (pw.padded_in // 128) >= sp:
                cfgs.append(("gemv", {"GEMV": True, "BLOCK_N": bn, "SPLIT": sp, "num_warps": nw}))
        out = torch.zeros(n, device="cuda", dtype=torch.float32)
        gcfg = plan_gemv(n, pw.padded_in, _block_k(pw.group))
        t = timed(lambda i: loads_only(x, pws[i], gcfg, out), r)
        rows.append(dict(shape=name, kernel="loads only (ablation)", config=str(gcfg), us=t * 1e6,
                         frac_copy_bw=pw.nbytes / t / bw, speedup_vs_bf16=t_bf16 / t))
        for kind, cfg in cfgs:
            try:
                y = wq_linear(x, pw, config=cfg)
                err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                t = timed(lambda i: wq_linear(x, pws[i], config=cfg), r)
            except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped, not fatal)
                print(f"{name} {kind} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append(dict(shape=name, kernel=kind, config=str(cfg), us=t * 1e6, rel_err=err,
                             frac_copy_bw=pw.nbytes / t / bw, speedup_vs_bf16=t_bf16 / t))
            print(rows[-1], flush=True)
    payload = dict(machine(), copy_GBps=bw / 1e9, bits=args.bits, rows=rows)
    md = [f"# W{args.bits}A16 at M = 1: kernel configurations ({payload['gpu']}, {payload['date']})", "",
          f"`{payload['command']}`", "", f"Copy bandwidth {bw / 1e9:.0f} GB/s. Best GEMV config per shape, the "
          "planned configs, and bf16 cuBLAS:", "",
          "| shape | kernel | config | µs | x bf16 | of copy BW |", "|---|---|---|---:|---:|---:|"]
    for name in SHAPES:
        sr = [r for r in rows if r["shape"] == name]
        best = min((r for r in sr if r["kernel"] == "gemv"), key=lambda r: r["us"], default=None)
        for r in [x for x in sr if x["kernel"] != "gemv"] + ([dict(best, kernel="gemv (best)")] if best else []):
            md.append(f"| {name} | {r['kernel']} | {r['config']} | {r['us']:.1f} | "
                      f"{r.get('speedup_vs_bf16', 1.0):.2f}x | {r['frac_copy_bw']:.1%} |")
    write_results(Path(args.out), payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
