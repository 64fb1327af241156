"""2:4 semi-structured sparse GEMM vs dense bf16 cuBLAS at Llama-3-8B layer shapes, prefill-sized M (GPU).

The weight is a random bf16 matrix (std 0.02) pruned to 2:4 by magnitude; the sparse side is
torch.sparse.to_sparse_semi_structured through cuSPARSELt (PyTorch's default) and through CUTLASS
(SparseSemiStructuredTensor._FORCE_CUTLASS), as lowbit's SparseLinear runs 2:4 layers on the GPU; the dense
side is F.linear on the same (pruned) weight. Both are checked against each other. Ceilings (bf16 matmul
rate, copy bandwidth) are measured in the same run; "dense-equivalent TFLOP/s" counts 2·M·N·K for both, so
the sparse tensor cores' limit is twice the dense rate.

    python benchmarks/sparse_gemm.py            # -> benchmarks/results/sparse_gemm_h200.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from ceilings import ceilings, cuda_time, git_rev, machine, write_results

SHAPES = {"q/o 4096x4096": (4096, 4096), "qkv 6144x4096": (6144, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336), "gate+up 28672x4096": (28672, 4096)}
MS = (2048, 4096, 8192, 16384)
OUT = Path(__file__).parent / "results" / "sparse_gemm_h200"


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 along the input."""
    g = w.reshape(w.shape[0], -1, 4)                                          # [N, K/4, 4]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter(-1, g.abs().topk(2, -1).indices, True)
    return (g * keep).reshape(w.shape)                                        # [N, K]


def main(argv=None) -> int:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--m", default=",".join(map(str, MS)))
    args = ap.parse_args(argv)
    ms = [int(m) for m in args.m.split(",")]
    torch.manual_seed(0)
    ceil = ceilings()
    rows = []
    for name, (n, k) in SHAPES.items():
        w = prune_2of4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        sparse = {}
        for backend in ("cusparselt", "cutlass"):
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
            try:
                sparse[backend] = to_sparse_semi_structured(w)
            except Exception as e:   # e.g. a PyTorch build without cuSPARSELt
                print(f"{name}: {backend} unavailable ({type(e).__name__}: {e})")
            print(name, backend, type(sparse.get(backend)).__name__, flush=True)
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            flop = 2 * m * n * k
            t_dense = cuda_time(lambda: F.linear(x, w))
            row = {"shape": name, "N": n, "K": k, "M": m, "dense_us": t_dense * 1e6,
                   "dense_TFLOPs": flop / t_dense / 1e12}
            for backend, ws in sparse.items():
                try:
                    y = F.linear(x, ws)
                except RuntimeError as e:   # CUTLASS's 2:4 kernels are built for compute capability 8.x only
                    row[f"{backend}_error"] = str(e).splitlines()[0]
                    continue
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = cuda_time(lambda: F.linear(x, ws))
                row.update({f"{backend}_us": t * 1e6, f"{backend}_TFLOPs": flop / t / 1e12,
                            f"{backend}_speedup": t_dense / t, f"{backend}_rel_err": err})
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    meta = {"machine": machine(), "ceilings": ceil, "git": git_rev(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/sparse_gemm.py " + " ".join(argv or [])}
    errors = sorted({r[k] for r in rows for k in r if k.endswith("_error")})
    md = [f"# 2:4 sparse GEMM vs dense bf16 ({meta['machine'].get('gpu')})", "", *(f"- refused: `{e}`" for e in errors),
          f"- date: {meta['date']}, git {meta['git']}, torch {torch.__version__}",
          f"- command: `{meta['command']}`",
          f"- measured ceilings: bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s, copy {ceil['copy_GBps']:.0f} GB/s", "",
          "| shape | M | dense µs | dense TFLOP/s | cuSPARSELt µs | speed-up | CUTLASS µs | speed-up | max rel. diff |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['M']} | {r['dense_us']:.1f} | {r['dense_TFLOPs']:.0f} | "
                  f"{r.get('cusparselt_us', float('nan')):.1f} | {r.get('cusparselt_speedup', float('nan')):.2f}x | "
                  f"{r.get('cutlass_us', float('nan')):.1f} | {r.get('cutlass_speedup', float('nan')):.2f}x | "
                  f"{max(r.get('cusparselt_rel_err', 0), r.get('cutlass_rel_err', 0)):.1e} |")
    write_results(Path(args.out), {"meta": meta, "rows": rows}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
