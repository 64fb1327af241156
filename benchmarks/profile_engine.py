"""Where the engine's offline time goes (GPU): cProfile of `run_engine` on N requests, random weights.

Host functions that wait for the GPU (a device->host copy of sampled tokens) absorb the GPU time of
the step before them, so a profile dominated by them is GPU-bound, one dominated by Python is not.

    python benchmarks/profile_engine.py --requests 300 --out benchmarks/results/profile_engine_h100.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from engine_throughput import make_requests, run_engine
from lowbit.atomic import write_text_atomic
from lowbit.models.shapes import random_llama


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model = random_llama(args.shape, torch.bfloat16, "cuda")
    reqs = make_requests(args.requests, model.config.vocab_size, 0, 100, 300, 100, 300)
    run_engine(model, reqs[:16], 16, args.max_num_seqs)                     # warm-up: graphs, Triton
    prof = cProfile.Profile()
    prof.enable()
    res = run_engine(model, reqs, 16, args.max_num_seqs)
    prof.disable()
    buf = io.StringIO()
    buf.write(f"{res}\n\n")
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(35)
    # GPU side of 30 steady-state steps: kernels by total GPU time, against the steps' wall time.
    from lowbit.config import SamplingParams
    from lowbit.engine import Engine
    eng = Engine(model, None, num_blocks=sum(-(-(len(p) + o) // 16) for p, o in reqs) + 4, block_size=16,
                 max_num_seqs=args.max_num_seqs)
    for p, o in reqs:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    for _ in range(40):
        eng.step()
    import time
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tp:
        for _ in range(30):
            eng.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gpu = sum(e.device_time_total for e in tp.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    buf.write(f"\n30 steps after 40: wall {wall * 1e3:.1f} ms (profiled), GPU kernel time {gpu / 1e3:.1f} ms\n")
    buf.write(tp.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=60))
    text = buf.getvalue()
    print(text[-9000:])
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
