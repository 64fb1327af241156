"""W4A16 kernel configurations against bf16 cuBLAS on the Llama-3-8B and -70B layer shapes (GPU).

Decode sizes (M <= 64): the Marlin-class CUDA kernel (lowbit/kernels/w4a16.py) at its planned K split
and at every power-of-two split, and the Triton kernels (GEMV at M = 1, tl.dot above) at their plans.
Larger M (128, 256): dequantize + cuBLAS, the CUDA kernel in 32-row launches, and the Triton tl.dot
kernel over a few tiles (BLOCK_M x BLOCK_N x warps x stages). Each point is timed over layer copies
that exceed 2x L2 (weights stream from HBM) as CUDA-graph replays; fractions are of the copy bandwidth
and bf16 matmul rate measured in the same run. What the sweep finds becomes `w4a16.plan_split`,
`wq_gemm.choose_path`.

    python benchmarks/wq_sweep.py --out benchmarks/results/wq_sweep_h200
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ceilings import ceilings, cuda_time, git_rev, machine, write_results
from lowbit.kernels import w4a16
from lowbit.kernels.wq_gemm import repack, wq_linear
from lowbit.layers import WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336), "k/v 1024x4096": (1024, 4096),
          "70B q/o 8192x8192": (8192, 8192), "70B gate/up 28672x8192": (28672, 8192)}
SMALL_M, LARGE_M = (1, 16, 32, 64), (128, 256)


def clone(pw):
    """An independent copy of a PackedWeight (its tensors, and its Marlin layout's)."""
    mw = pw.marlin and dataclasses.replace(pw.marlin, qweight=pw.marlin.qweight.clone(),
                                           scale_offset=pw.marlin.scale_offset.clone())
    return dataclasses.replace(pw, qweight=pw.qweight.clone(), scale=pw.scale.clone(),
                               offset=pw.offset.clone(), marlin=mw)


def timed(fn_per_copy, copies: int, iters: int) -> float:
    def run():
        for i in range(copies):
            fn_per_copy(i)
    return cuda_time(run, iters=iters) / copies


def configs(M: int, pw) -> list[tuple[str, dict]]:
    kc = pw.marlin.padded_in // 64
    out = [("marlin (plan)", {"path": "marlin"})]
    if M <= 64:
        out.insert(0, ("triton (plan)", {"GEMV": M == 1}))
        out += [("marlin", {"path": "marlin", "split": s}) for s in (1, 2, 4, 8, 16) if kc // 2 >= 2 * s]
        return out
    out.insert(0, ("dequant+cuBLAS", {"path": "dequant"}))
    for bm, bn, nw in ((64, 128, 4), (128, 128, 8), (128, 256, 8)):
        out.append(("triton dot", {"path": "dot", "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": 1, "UNPACK_3D": True,
                                   "num_warps": nw, "num_stages": 3}))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wq_sweep_h200"))
    ap.add_argument("--shapes", default=None, help="comma list of shape-name prefixes")
    ap.add_argument("--m", default=None, help="comma list of M (default: 1,16,32,64,128,256)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if not w4a16.available():
        raise SystemExit("the W4A16 CUDA kernel is unavailable here (nvcc?)")
    t0 = time.perf_counter()
    ceil = ceilings()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ms = [int(v) for v in args.m.split(",")] if args.m else list(SMALL_M + LARGE_M)
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or any(k.startswith(p) for p in args.shapes.split(","))}
    rows = []
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.normal_(0, 0.02)
        pw = repack(WeightOnlyLinear.from_linear(lin, QuantSpec(bits=4, group_size=128, symmetric=False),
                                                 dtype=torch.bfloat16))
        r = max(1, math.ceil(2 * l2 / pw.marlin.nbytes))
        pws = [pw] + [clone(pw) for _ in range(r - 1)]
        rb = max(1, math.ceil(2 * l2 / (n * k * 2)))
        ws = [lin.weight] + [lin.weight.clone() for _ in range(rb - 1)]
        for M in ms:
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            ref = wq_linear(x, pw, config={"path": "dequant"})
            t_bf16 = timed(lambda i: F.linear(x, ws[i]), rb, args.iters)
            base = dict(shape=name, N=n, K=k, M=M)
            rows.append(dict(base, kernel="bf16 cuBLAS", config="", us=t_bf16 * 1e6,
                             frac_copy_bw=n * k * 2 / t_bf16 / 1e9 / ceil["copy_GBps"],
                             frac_bf16=2 * M * n * k / t_bf16 / 1e12 / ceil["bf16_TFLOPs"]))
            for kind, cfg in configs(M, pw):
                try:
                    y = wq_linear(x, pw, config=cfg)
                    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                    t = timed(lambda i: wq_linear(x, pws[i], config=cfg), r, args.iters)
                except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped, not fatal)
                    print(f"{name} M={M} {kind} {cfg}: {type(e).__name__}: {str(e)[:160]}")
                    continue
                wb = pw.nbytes
                rows.append(dict(base, kernel=kind, config=str(cfg), us=t * 1e6, rel_err=err,
                                 frac_copy_bw=wb / t / 1e9 / ceil["copy_GBps"],
                                 frac_bf16=2 * M * n * k / t / 1e12 / ceil["bf16_TFLOPs"],
                                 speedup_vs_bf16=t_bf16 / t))
            best = max((x for x in rows if x["shape"] == name and x["M"] == M and "speedup_vs_bf16" in x),
                       key=lambda x: x["speedup_vs_bf16"], default=None)
            if best:
                print(f"{name} M={M}: bf16 {t_bf16 * 1e6:.1f} us; best {best['kernel']} {best['config']} "
                      f"{best['us']:.1f} us ({best['speedup_vs_bf16']:.2f}x, {best['frac_copy_bw']:.0%} BW, "
                      f"err {best['rel_err']:.1e})", flush=True)
        pws = ws = None  # free before the next shape
        torch.cuda.empty_cache()
    payload = dict(machine=machine(), git=git_rev(), ceilings=ceil, seconds=time.perf_counter() - t0, rows=rows)
    md = [f"# W4A16 kernel configurations ({payload['machine']['gpu']}, {payload['machine']['date']})", "",
          f"`{payload['machine']['command']}` (git {payload['git']})", "",
          f"Ceilings in this run: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s. "
          "Per (shape, M): bf16 cuBLAS, each kernel family's best config, and the speed-up over bf16.", "",
          "| shape | M | kernel | config | µs | x bf16 | of copy BW | of bf16 rate | rel err |",
          "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for name in shapes:
        for M in ms:
            sr = [x for x in rows if x["shape"] == name and x["M"] == M]
            for kind in dict.fromkeys(x["kernel"] for x in sr):
                b = min((x for x in sr if x["kernel"] == kind), key=lambda x: x["us"])
                md.append(f"| {name} | {M} | {kind} | {b['config']} | {b['us']:.1f} | "
                          f"{b.get('speedup_vs_bf16', 1.0):.2f}x | {b['frac_copy_bw']:.1%} | {b['frac_bf16']:.1%} | "
                          f"{b.get('rel_err', 0.0):.1e} |")
    write_results(Path(args.out), payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
