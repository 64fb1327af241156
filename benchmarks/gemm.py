"""Quantized linear layers vs bf16 cuBLAS at Llama-3-8B layer shapes, one layer's forward at a time (GPU).

Formats: bf16 F.linear (cuBLAS), w4a16 (WeightOnlyLinear int4 asymmetric, group 128), w8a16 (WeightOnlyLinear
int8 symmetric per channel), int8 (Int8Linear W8A8, per-token dynamic activations), fp8 (FP8Linear e4m3,
per-channel weights, per-tensor dynamic activations), int8-intmm (Int8Linear's buffers through
torch._int_mm + one rescale pass: the prefill alternative to the fused Triton GEMM). Each layer is built
with its from_linear from one random nn.Linear (std 0.02, bf16, no bias, as Llama's projections).

Timing: the forward is captured in a CUDA graph (what a decode step pays: no Python launch overhead) and
replayed through ceilings.cuda_time; where capture fails the eager time is used and the row says so.
Weights at these sizes fit in the 50 MB L2, so each timed replay runs the forward on R copies of the
layer whose weights together exceed 2x L2 (time / R per forward): every call streams its weight from HBM.
Bytes = stored weight (codes + scales/zeros) + activations in + out; FLOP = 2*M*N*K. Ceilings (copy
bandwidth, bf16 matmul rate) are measured in the same run. Accuracy, per (shape, M, format): max |y - ref|
/ max |ref| against the format's own reference path (kernels disabled, same CUDA tensors) and against
bf16 F.linear (the quantization error).

    python benchmarks/gemm.py                        # -> benchmarks/results/gemm_h100.{json,md}, < 8 min
    python benchmarks/gemm.py --quick                # smoke run -> ..._quick.{json,md}
    python benchmarks/gemm.py --formats bf16,w4a16 --m 1,16
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ceilings import ceilings, cuda_time, git_rev, machine, write_results
from lowbit.kernels import kernels_disabled
from lowbit.layers import FP8Linear, Int8Linear, WeightOnlyLinear
from lowbit.kernels.primitives import QuantSpec

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096),  # name: (N = out, K = in)
          "down 4096x14336": (4096, 14336), "k/v 1024x4096": (1024, 4096),
          "70B q/o 8192x8192": (8192, 8192), "70B gate/up 28672x8192": (28672, 8192)}
LARGE = ("gate/up 14336x4096", "down 4096x14336", "70B q/o 8192x8192", "70B gate/up 28672x8192")
MS = (1, 4, 16, 32, 64, 128, 256, 2048)
FORMATS = ("bf16", "w4a16", "w4a16-triton", "w4a16-dq", "torchao-int4", "w8a16", "int8", "fp8", "int8-intmm")
OUT = Path(__file__).parent / "results" / "gemm_h200"


class IntMM(nn.Module):
    """Int8Linear's buffers through the torch._int_mm backend of lowbit.kernels.int8_gemm.int8_linear."""

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from lowbit.kernels import use_kernels
        if not use_kernels(x):  # the reference, as the layer itself would take
            return self.layer(x)
        from lowbit.kernels.int8_gemm import int8_linear
        lay = self.layer
        return int8_linear(x, lay.qweight, lay.w_scale, lay.bias, lay.act_scale, backend="int_mm")

    def nbytes(self):
        return self.layer.nbytes()


class WQPath(nn.Module):
    """A WeightOnlyLinear forced onto one wq_gemm path: "triton" (the Triton kernels, as before the CUDA
    kernel) or "dequant" (dequantize + cuBLAS at every M): the baselines of the W4A16 rows."""

    def __init__(self, layer: WeightOnlyLinear, path: str):
        super().__init__()
        self.layer, self.path = layer, path

    def forward(self, x):
        from lowbit.kernels import use_kernels
        from lowbit.kernels.wq_gemm import LARGE_M, wq_linear
        if not use_kernels(x):
            return self.layer(x)
        pw = self.layer.kernel_weight()
        m = x.reshape(-1, x.shape[-1]).shape[0]
        if self.path == "dequant" or m > LARGE_M:
            cfg = {"path": "dequant"}
        else:
            cfg = {"GEMV": m == 1}
        return wq_linear(x, pw, self.layer.bias, cfg)

    def nbytes(self):
        return self.layer.nbytes()


class TorchaoInt4(nn.Module):
    """torchao's int4 weight-only layer (tinygemm: aten._weight_int4pack_mm, group 128, asymmetric), the
    peer the issue names; built by torchao's quantize_ when torchao imports, else by the same aten op."""

    def __init__(self, lin: nn.Linear, group: int = 128):
        super().__init__()
        self.impl, self.N, self.K, self.group = None, lin.out_features, lin.in_features, group
        try:
            import torchao
            from torchao.quantization import Int4WeightOnlyConfig, quantize_
            mod = nn.Sequential(copy.deepcopy(lin))
            try:
                quantize_(mod, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
            except TypeError:
                quantize_(mod, Int4WeightOnlyConfig(group_size=group))
            self.mod, self.impl = mod, f"torchao {torchao.__version__} Int4WeightOnlyConfig(tile_packed_to_4d)"
        except Exception as e:  # noqa: BLE001 (no torchao, or its config changed: the aten kernel itself)
            print(f"    torchao int4 unavailable ({type(e).__name__}: {str(e)[:120]}); aten tinygemm directly")
            self._aten(lin, group)

    def _aten(self, lin, group):
        w = lin.weight.float()                                              # [N, K]
        N, K = w.shape
        wg = w.reshape(N, K // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
        zero = lo + 8 * scale                                               # tinygemm: (q - 8) * s + z
        packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)          # [N, K/2]
        self.packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8.contiguous(), 8)
        self.sz = torch.stack((scale, zero), -1).reshape(N, K // group, 2).transpose(0, 1).contiguous().to(
            torch.bfloat16)                                                 # [K/g, N, 2]
        self.group, self.mod, self.impl = group, None, "aten._weight_int4pack_mm (tinygemm)"

    def forward(self, x):
        if self.mod is not None:
            return self.mod(x)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.sz)

    def nbytes(self):
        """tinygemm's bytes: 4-bit codes + a bf16 (scale, zero) pair per group and column."""
        return self.N * self.K // 2 + self.K // self.group * self.N * 4


def build(fmt: str, lin: nn.Linear) -> nn.Module:
    """One layer of format fmt from the bf16 nn.Linear lin (on the GPU)."""
    if fmt == "bf16":
        return lin
    if fmt == "w4a16":
        spec = QuantSpec(bits=4, symmetric=False, group_size=128)
        return WeightOnlyLinear.from_linear(lin, spec, dtype=torch.bfloat16)
    if fmt in ("w4a16-triton", "w4a16-dq"):
        spec = QuantSpec(bits=4, symmetric=False, group_size=128)
        return WQPath(WeightOnlyLinear.from_linear(lin, spec, dtype=torch.bfloat16), {"w4a16-triton": "triton", "w4a16-dq": "dequant"}[fmt])
    if fmt == "torchao-int4":
        return TorchaoInt4(lin)
    if fmt == "w8a16":
        spec = QuantSpec(bits=8, symmetric=True, group_size=-1)
        return WeightOnlyLinear.from_linear(lin, spec, dtype=torch.bfloat16)
    if fmt == "int8":
        return Int8Linear.from_linear(lin, dtype=torch.bfloat16)
    if fmt == "fp8":
        return FP8Linear.from_linear(lin, dtype=torch.bfloat16)
    if fmt == "int8-intmm":
        return IntMM(Int8Linear.from_linear(lin, dtype=torch.bfloat16))
    raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def weight_bytes(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return sum(t.numel() * t.element_size() for t in layer.parameters())
    return layer.nbytes()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def time_forward(copies: list[nn.Module], x: torch.Tensor, iters: int) -> tuple[float, float, bool]:
    """(seconds per forward in a CUDA graph (eager if capture fails), eager seconds, captured?)."""
    def run():
        for c in copies:
            c(x)
    r = len(copies)
    eager = cuda_time(run, iters=max(3, iters // 2)) / r
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (JIT, lazily built layouts, probes) outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
    except Exception as e:  # noqa: BLE001 (any capture failure: report eager)
        print(f"    graph capture failed ({type(e).__name__}: {str(e)[:100]}); eager timing")
        torch.cuda.synchronize()
        return eager, eager, False
    t = cuda_time(g.replay, iters=iters) / r
    del g
    return t, eager, True


def bench_shape(name: str, n: int, k: int, ms, formats, iters: int, ceil: dict, rotate_bytes: int) -> list[dict]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.normal_(0, 0.02)
    rows = []
    for fmt in formats:
        t0 = time.perf_counter()
        try:
            layer = build(fmt, lin)
        except Exception as e:  # noqa: BLE001 (one broken format must not end an 8-minute run)
            print(f"  {fmt}: build failed: {type(e).__name__}: {e}")
            rows += [dict(shape=name, N=n, K=k, M=m, format=fmt, error=f"build: {e}") for m in ms]
            continue
        wb = weight_bytes(layer)
        r = max(1, min(64, math.ceil(rotate_bytes / wb)))  # copies so the weights cycle through HBM
        copies = [layer] + [copy.deepcopy(layer) for _ in range(r - 1)]
        for m in ms:
            gen = torch.Generator(device="cuda").manual_seed(m)  # the same x for every format
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            row = dict(shape=name, N=n, K=k, M=m, format=fmt, copies=r)
            if isinstance(layer, TorchaoInt4):
                row["impl"] = layer.impl
            if fmt == "int8":  # the Triton tiles this (M, N, K) gets, for tuning
                from lowbit.kernels.int8_gemm import gemm_config
                row["int8_config"] = gemm_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            try:
                y = layer(x)
                with kernels_disabled():
                    ref = layer(x)
                row["rel_err_vs_ref"] = rel_err(y, ref)
                row["rel_err_vs_bf16"] = rel_err(y, F.linear(x, lin.weight))
                t, eager, graphed = time_forward(copies, x, iters)
            except Exception as e:  # noqa: BLE001
                print(f"  {fmt} M={m}: failed: {type(e).__name__}: {str(e)[:200]}")
                rows.append(dict(row, error=str(e)[:500]))
                continue
            nbytes = wb + m * k * 2 + m * n * 2  # weight (+ scales/zeros) + bf16 activations in and out
            flop = 2 * m * n * k
            row.update(us=t * 1e6, eager_us=eager * 1e6, graph=graphed, bytes=nbytes, GBps=nbytes / t / 1e9,
                       frac_copy_bw=nbytes / t / 1e9 / ceil["copy_GBps"], TFLOPs=flop / t / 1e12,
                       frac_bf16_peak=flop / t / 1e12 / ceil["bf16_TFLOPs"])
            rows.append(row)
        print(f"  {fmt}: {len(ms)} M in {time.perf_counter() - t0:.1f}s (x{r} copies)")
        del copies, layer
        torch.cuda.empty_cache()
    base = {r["M"]: r.get("us") for r in rows if r["format"] == "bf16"}
    for row in rows:
        if row.get("us") and base.get(row["M"]):
            row["speedup_vs_bf16"] = base[row["M"]] / row["us"]
    return rows


def _speedups(rows, fmt, pred, base="bf16"):
    """{(shape, M): time(base) / time(fmt)} over the rows that pass pred(shape, M)."""
    t = {(r["shape"], r["M"], r["format"]): r["us"] for r in rows if "us" in r}
    return {(sh, m): t[(sh, m, base)] / t[(sh, m, f)] for (sh, m, f) in t
            if f == fmt and (sh, m, base) in t and pred(sh, m)}


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The issue's GEMM targets, each (target, measured, met / not met / not measured)."""
    out = []

    def check(name, sp, bound):
        if not sp:
            out.append((name, "-", "not measured"))
            return
        worst = min(sp, key=sp.get)
        out.append((name, f"min {sp[worst]:.2f}x ({worst[0]}, M={worst[1]}); "
                          + ", ".join(f"{k[0].split()[-1]} M={k[1]}: {v:.2f}x" for k, v in sorted(sp.items())),
                    "met" if sp[worst] >= bound else "NOT met"))
    large = lambda sh, m: sh in LARGE  # noqa: E731
    check("W4A16 >= 3.0x cuBLAS bf16 at M = 1, large shapes", _speedups(rows, "w4a16", lambda sh, m: large(sh, m) and m == 1), 3.0)
    check("W4A16 >= 2.5x cuBLAS bf16 at M = 16, large shapes", _speedups(rows, "w4a16", lambda sh, m: large(sh, m) and m == 16), 2.5)
    check("W4A16 >= 1.0x cuBLAS bf16 at M = 64, large shapes", _speedups(rows, "w4a16", lambda sh, m: large(sh, m) and m == 64), 1.0)
    check("W4A16 >= dequantize + cuBLAS above M = 64", _speedups(rows, "w4a16", lambda sh, m: m > 64, base="w4a16-dq"), 1.0)
    check("W4A16 faster than torchao int4 (tinygemm) at every M", _speedups(rows, "w4a16", lambda sh, m: True,
                                                                          base="torchao-int4"), 1.0)
    eight_b = lambda sh, m: not sh.startswith("70B") and sh in LARGE + ("q/o 4096x4096",) and m >= 2048  # noqa: E731
    check("W8A8 int8 >= 1.5x cuBLAS bf16 at M >= 2048, 8B shapes", _speedups(rows, "int8", eight_b), 1.5)
    check("W8A8 fp8 >= 1.6x cuBLAS bf16 at M >= 2048, 8B shapes", _speedups(rows, "fp8", eight_b), 1.6)
    return out


def summary(rows: list[dict]) -> str:
    return "; ".join(f"{name}: {verdict}" for name, _, verdict in targets(rows))


def fmt_num(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], meta: dict, formats, ms) -> str:
    c = meta["ceilings"]
    lines = [f"# Quantized GEMM vs bf16 cuBLAS ({meta['machine']['gpu']})", "",
             f"{meta['machine']['date']}, torch {meta['machine']['torch']}, triton {meta['machine']['triton']}, "
             f"git {meta['git']}. Command: `{meta['machine']['command']}`", "",
             f"Ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['bf16_TFLOPs']:.0f} "
             "TFLOP/s. Times are per forward, from CUDA-graph replays over layer copies that exceed 2x L2 (weights "
             "come from HBM); `*` = eager (capture failed). int8/fp8 tensor cores peak at 2x bf16, so their "
             "fraction of the bf16 rate can pass 1.", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {n} | {m} | **{v}** |" for n, m, v in targets(rows)]
    impls = sorted({r["impl"] for r in rows if r.get("impl")})
    lines += ["", f"torchao-int4 ran as: {', '.join(impls)}." if impls else "", ""]
    by = {(r["shape"], r["M"], r["format"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lines += [f"## {shape}", "", "| M | " + " | ".join(f"{f} µs (x)" for f in formats) + " |",
                  "|---:|" + "---:|" * len(formats)]
        for m in ms:
            cells = []
            for f in formats:
                r = by.get((shape, m, f), {})
                if "us" not in r:
                    cells.append("error" if "error" in r else "-")
                    continue
                sp = r.get("speedup_vs_bf16")
                speed = f" ({sp:.2f}x)" if sp and f != "bf16" else ""
                cells.append(f"{r['us']:.1f}{'' if r['graph'] else '*'}{speed}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "| format | M | µs | eager µs | MB moved | GB/s | of copy BW | TFLOP/s | of bf16 rate "
                  "| rel err vs ref | rel err vs bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for f in formats:
            for m in ms:
                r = by.get((shape, m, f))
                if r is None or "us" not in r:
                    continue
                lines.append(f"| {f} | {m} | {r['us']:.1f} | {r['eager_us']:.1f} | {r['bytes'] / 1e6:.1f} | "
                             f"{r['GBps']:.0f} | {r['frac_copy_bw']:.2f} | {r['TFLOPs']:.1f} | "
                             f"{r['frac_bf16_peak']:.2f} | {fmt_num(r.get('rel_err_vs_ref'), '.1e')} | "
                             f"{fmt_num(r.get('rel_err_vs_bf16'), '.1e')} |")
        lines.append("")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Errors", ""] + [f"- {r['shape']} M={r['M']} {r['format']}: {r['error'][:200]}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one shape, M in 1,16,256, few iters; *_quick")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list from {','.join(FORMATS)}")
    ap.add_argument("--m", default=None, help="comma list of M (default: " + ",".join(map(str, MS)) + ")")
    ap.add_argument("--shapes", default=None, help="comma list of shape names' first word (q/o,gate/up,down,k/v)")
    ap.add_argument("--iters", type=int, default=None, help="timed graph replays per point (default 20, quick 5)")
    ap.add_argument("--out", type=Path, default=None, help="results path without suffix")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm.py needs a CUDA GPU")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise SystemExit(f"unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if "bf16" not in formats:
        formats.insert(0, "bf16")  # the baseline every speed-up is against
    ms = [int(v) for v in args.m.split(",")] if args.m else ([1, 16, 256] if args.quick else list(MS))
    shapes = {k: v for k, v in SHAPES.items() if args.shapes is None or k.split()[0] in args.shapes.split(",")}
    if args.quick and args.shapes is None:
        shapes = dict(list(SHAPES.items())[:1])
    iters = args.iters or (5 if args.quick else 20)
    out = args.out or (OUT.with_name(OUT.name + "_quick") if args.quick else OUT)

    t_start = time.perf_counter()
    ceil = ceilings()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"ceilings: {ceil}, L2 {l2 / 2**20:.0f} MiB")
    rows = []
    with torch.no_grad():
        for name, (n, k) in shapes.items():
            print(f"{name}")
            rows += bench_shape(name, n, k, ms, formats, iters, ceil, rotate_bytes=2 * l2)
    meta = {"machine": machine(), "git": git_rev(), "ceilings": ceil, "l2_bytes": l2, "iters": iters,
            "seconds": time.perf_counter() - t_start, "formats": formats, "M": ms,
            "summary": summary(rows)}
    write_results(out, {**meta, "rows": rows}, markdown(rows, meta, formats, ms))
    print(summary(rows))
    print(f"wrote {out}.json/.md in {meta['seconds']:.0f}s")


if __name__ == "__main__":
    main()
