"""Where lowbit's batch-1 CPU decode step goes, on the default model (SmolLM2-135M), `--threads` threads.

    python benchmarks/cpu_profile.py [--threads 2] [--out benchmarks/results/cpu_profile]

1. Per-step overhead: a decode step of the same graph (30 blocks, 9/3 heads, every op) at tiny widths
   (d=72, ffn 64, vocab 64), whose matmuls cost nothing: what Python, module calls and op dispatch cost.
2. Real decode steps (after a 128-token prefill, 64-token KV cache growth): fp32 and each quantized format,
   through lowbit's C kernel ("c"), PyTorch's CPU kernels ("aten") and the dequantize-every-forward
   reference path; and fp32 without the head (a 576x8 stand-in): what the tied 49152x576 head costs.
3. Matmuls at M=1 for each of the model's shapes: fp32 F.linear, WeightOnlyLinear's dequantize path and
   both CPU kernels, summed per token (30 blocks x 7 projections + the tied 49152x576 head). The same weight
   is called repeatedly, so it is cache-hot: these are compute costs, not a decode step's memory traffic.
4. torch.profiler's top ops of one quantized decode step.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.atomic import write_json_atomic, write_text_atomic
from lowbit.kernels import kernels_disabled
from lowbit.kernels.cpu_wq import c_kernel, preferred_backend
from lowbit.kernels.primitives import QuantSpec
from lowbit.layers import WeightOnlyLinear
from lowbit.models.loader import load
from lowbit.models.shapes import random_llama
from lowbit.quant.api import quantize

BACKENDS = ("c", "aten") if c_kernel() is not None else ("aten",)
FORMATS = {  # name -> rtn options
    "int4-sym-g32": dict(bits=4, group_size=32, sym=True),
    "int8-sym-ch": dict(bits=8, group_size=-1, sym=True),
    "int4-asym-g32": dict(bits=4, group_size=32),
    "int4-asym-g64": dict(bits=4, group_size=64),
    "int4-fzp-g32": dict(bits=4, group_size=32, zero_point="float"),
}
SHAPES = {  # projection -> (out, in), count per token
    "q_proj/o_proj": ((576, 576), 60), "k_proj/v_proj": ((192, 576), 60),
    "gate_proj/up_proj": ((1536, 576), 60), "down_proj": ((576, 1536), 30), "lm_head": ((49152, 576), 1),
}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def best_of(fn, n: int, reps: int = 5) -> float:
    """Seconds per call: the fastest of `reps` runs of n calls (after one warm-up call)."""
    for _ in range(1):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


@torch.inference_mode()
def step_seconds(model, prompt: int = 128, steps: int = 64) -> float:
    """Median seconds of one batch-1 decode step (model(next_id, cache)) after a `prompt`-token prefill."""
    cache = model.new_cache(1, prompt + steps + 8)
    ids = torch.arange(prompt)[None] % model.config.vocab_size
    model(ids, cache=cache, last_only=True)
    nxt = torch.tensor([[1]])
    for _ in range(4):
        model(nxt, cache=cache)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(nxt, cache=cache)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.inference_mode()
def matmuls(base) -> list[dict]:
    """ms per M=1 matmul, per shape and path; and per token (summed with each shape's count)."""
    rows = []
    lin = {"q_proj/o_proj": base.model.layers[0].self_attn.q_proj, "k_proj/v_proj": base.model.layers[0].self_attn.k_proj,
           "gate_proj/up_proj": base.model.layers[0].mlp.gate_proj, "down_proj": base.model.layers[0].mlp.down_proj,
           "lm_head": base.lm_head}
    for name, ((n, k), count) in SHAPES.items():
        x = torch.randn(1, k)
        w = lin[name].weight
        iters = 10 if name == "lm_head" else 100
        row = {"shape": name, "out": n, "in": k, "per_token": count,
               "fp32": best_of(lambda: F.linear(x, w), iters) * 1e3}
        for fmt, opt in FORMATS.items():
            spec = QuantSpec(bits=opt["bits"], symmetric=opt.get("sym", False), group_size=opt["group_size"],
                             zero_point=opt.get("zero_point", "int"))
            layer = WeightOnlyLinear.from_linear(lin[name], spec)
            with kernels_disabled():  # slow (a whole-weight dequantize per call): few calls
                row[f"{fmt} dequantize"] = best_of(lambda: layer(x), 2 if name == "lm_head" else 10, reps=3) * 1e3
            for backend in BACKENDS:
                with preferred_backend(backend):
                    if layer.cpu_weight() is not None:
                        row[f"{fmt} {backend}"] = best_of(lambda: layer(x), iters) * 1e3
        rows.append(row)
    cols = [c for c in rows[0] if c not in ("shape", "out", "in", "per_token")]
    total = {"shape": "per token (blocks)", "out": "", "in": "", "per_token": ""}
    for c in cols:
        total[c] = sum(r[c] * r["per_token"] for r in rows if r["shape"] != "lm_head" and c in r)
    rows.append(total)
    return rows


@torch.inference_mode()
def top_ops(model, n: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    cache = model.new_cache(1, 160)
    model(torch.arange(128)[None], cache=cache, last_only=True)
    nxt = torch.tensor([[1]])
    model(nxt, cache=cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            model(nxt, cache=cache)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls_per_step": e.count / 4, "self_ms_per_step": e.self_cpu_time_total / 4e3}
            for e in ev]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cpu_profile")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_start = loadavg()
    model, _ = load(None, dtype="fp32")
    model.eval()

    tiny = random_llama("smollm2", dtype=torch.float32, hidden_size=72, intermediate_size=64, vocab_size=64)
    steps = {"tiny widths (overhead)": step_seconds(tiny) * 1e3, "fp32": step_seconds(model) * 1e3}
    headless = copy.deepcopy(model)
    headless.lm_head = torch.nn.Linear(576, 8, bias=False)
    steps["fp32 without the head"] = step_seconds(headless) * 1e3
    del headless
    for fmt, opt in FORMATS.items():
        q = copy.deepcopy(model)
        quantize(q, "rtn", None, progress=False, **opt)
        for backend in BACKENDS:
            with preferred_backend(backend):
                steps[f"{fmt} {backend}"] = step_seconds(q) * 1e3
        with kernels_disabled():
            steps[f"{fmt} dequantize"] = step_seconds(q, steps=8) * 1e3
        if fmt == "int4-sym-g32":
            ops = top_ops(q)
        del q
    mm = matmuls(model)
    payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()},
               "threads": a.threads, "command": "python " + " ".join(sys.argv),
               "loadavg_start": load_start, "loadavg_end": loadavg(),
               "decode_step_ms": steps, "matmul_ms": mm, "top_ops_int4_sym_g32": ops}
    out = Path(a.out)
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(payload))
    print(markdown(payload))


def markdown(p: dict) -> str:
    lines = [f"# lowbit CPU decode profile (SmolLM2-135M, batch 1, {p['threads']} threads)", "",
             f"{p['date']}, {p['machine']}, `{p['command']}`, load average (1/5/15 min) at start "
             f"{p['loadavg_start']}, at end {p['loadavg_end']}.", "",
             "## One decode step (median, 128-token prompt)", "", "| model | ms/step | tok/s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {1e3 / v:.1f} |" for k, v in p["decode_step_ms"].items()]
    mm = p["matmul_ms"]
    cols = [c for c in mm[0] if c not in ("shape", "out", "in", "per_token")]
    lines += ["", "## Matmuls at M=1 (ms per call; last row: ms per token over the 30 blocks, head excluded)", "",
              "| shape | out x in | per token | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for r in mm:
        lines.append(f"| {r['shape']} | {r['out']}x{r['in']} | {r['per_token']} | "
                     + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |")
    lines += ["", "## Top ops of one int4-sym-g32 decode step (torch.profiler, self CPU time; lowbit's C kernel is "
              "called through ctypes and does not appear)", "",
              "| op | calls/step | self ms/step |", "|---|---|---|"]
    lines += [f"| {o['op']} | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.3f} |"
              for o in p["top_ops_int4_sym_g32"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
