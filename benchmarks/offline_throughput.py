"""Offline throughput on the GPU: N requests (prompt and output lengths drawn around 200 tokens, seeded)
through lowbit's engine, bf16 and W4A16, against HF transformers batched `generate` at its best batch
size, on the same random-initialised weights in the same run.

    python benchmarks/offline_throughput.py --shape llama-1b --requests 1000

HF `generate` pads a batch to its longest prompt and runs every row for the batch's longest output; only
each request's own output tokens are counted for it. Its rate is measured on a subset of the requests
(--hf-requests) at each batch size and the best one is reported.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from ceilings import machine, write_results
from decode import hf_model
from engine_throughput import make_requests, run_engine
from lowbit.models.shapes import random_llama


def run_hf_batched(hf, reqs, batch_size):
    toks = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        chunk = reqs[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device="cuda")  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device="cuda")
        new = max(o for _, o in chunk)
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0)
        toks += sum(o for _, o in chunk)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return dict(batch_size=batch_size, requests=len(reqs), seconds=dt, output_tokens=toks, tokens_per_s=toks / dt)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--len-min", type=int, default=100)
    ap.add_argument("--len-max", type=int, default=300)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--formats", nargs="+", default=["bf16", "w4a16"])
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--hf-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_throughput_h100"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows, hf_rows = [], []
    for fmt in args.formats:
        model = random_llama(args.shape, torch.bfloat16, "cuda")
        if fmt == "w4a16":
            from lowbit.quant.api import quantize
            quantize(model, "rtn", bits=4, group_size=128, progress=False)
        reqs = make_requests(args.requests, model.config.vocab_size, args.seed, args.len_min, args.len_max,
                             args.len_min, args.len_max)
        run_engine(model, reqs[:8], args.block_size, args.max_num_seqs)        # warm-up (graphs, kernels)
        torch.cuda.reset_peak_memory_stats()
        r = run_engine(model, reqs, args.block_size, args.max_num_seqs)
        r.update(format=fmt, peak_memory_GB=torch.cuda.max_memory_allocated() / 1e9)
        rows.append(r)
        print(r, flush=True)
        if fmt == "bf16" and args.hf_batch_sizes:
            hf = hf_model(model)
            del model
            gc.collect()
            for bs in args.hf_batch_sizes:
                torch.cuda.reset_peak_memory_stats()
                try:
                    h = run_hf_batched(hf, reqs[:args.hf_requests], bs)
                except torch.OutOfMemoryError:
                    h = dict(batch_size=bs, error="out of memory")
                h["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
                hf_rows.append(h)
                print(h, flush=True)
            del hf
        gc.collect()
        torch.cuda.empty_cache()
    best = max((h for h in hf_rows if "tokens_per_s" in h), key=lambda h: h["tokens_per_s"], default=None)
    for r in rows:
        r["speedup_vs_best_hf"] = r["tokens_per_s"] / best["tokens_per_s"] if best else None
    payload = dict(machine(), shape=args.shape, requests=args.requests, lengths=[args.len_min, args.len_max],
                   block_size=args.block_size, max_num_seqs=args.max_num_seqs, lowbit=rows, hf=hf_rows)
    md = [f"# Offline throughput ({payload['gpu']}, {payload['date']})", "", f"`{payload['command']}`", "",
          f"{args.requests} requests on a random-initialised {args.shape} shape; prompt and output lengths "
          f"uniform in [{args.len_min}, {args.len_max}] (seed {args.seed}); greedy, EOS ignored. KV waste: "
          "allocated but unused token slots / allocated slots, sampled after every step.", "",
          "| system | output tok/s | vs best HF | KV waste (mean) | peak GB | preemptions |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = r["speedup_vs_best_hf"]
        md.append(f"| lowbit {r['format']} | {r['tokens_per_s']:.0f} | {'' if sp is None else f'{sp:.1f}x'} | "
                  f"{r['waste_mean']:.2%} | {r['peak_memory_GB']:.1f} | {r['preemptions']} |")
    for h in hf_rows:
        if "tokens_per_s" in h:
            md.append(f"| HF generate bf16, batch {h['batch_size']} ({h['requests']} requests) | "
                      f"{h['tokens_per_s']:.0f} | | | {h['peak_memory_GB']:.1f} | |")
        else:
            md.append(f"| HF generate bf16, batch {h['batch_size']} | {h['error']} | | | | |")
    write_results(Path(args.out), payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
