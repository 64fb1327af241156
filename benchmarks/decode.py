"""Batch-1 decode on the GPU: lowbit's engine (CUDA graphs, paged decode kernel, WkA16 kernels) against
HF transformers `generate` on the same random-initialised weights, in the same run.

    python benchmarks/decode.py --shapes llama3-8b smollm2 --formats bf16 w8a16 w4a16

Per shape and format: decode tokens/s (after the first token), bytes read per token (every weight the
step reads + the KV cache it attends over, averaged over the run), and tokens/s x bytes/token as a
fraction of the copy bandwidth measured in the same run — the roofline of a memory-bound decode.
"""
from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch

from ceilings import copy_bandwidth, machine, write_results
from lowbit.config import SamplingParams
from lowbit.engine import Engine
from lowbit.engine.paged_cache import kv_bytes_per_token
from lowbit.models.arch import config_to_hf
from lowbit.models.shapes import random_llama

FORMATS = {  # name -> rtn options (None: bf16 as is)
    "bf16": None,
    "w8a16": dict(bits=8, group_size=-1, sym=True),
    "w4a16": dict(bits=4, group_size=128),
}


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads from weights: every Linear in the layout its kernel reads (the packed
    copy for WkA16; all buffers where the reference path runs), norms, and one embedding row."""
    from lowbit.models.llama import RMSNorm
    from lowbit.layers import WeightOnlyLinear
    total = 0
    for mod in model.modules():
        if isinstance(mod, WeightOnlyLinear):
            pw = mod.kernel_weight()
            total += pw.nbytes if pw is not None else sum(b.numel() * b.element_size() for b in mod.buffers())
        elif isinstance(mod, (torch.nn.Linear, RMSNorm)):
            total += mod.weight.numel() * mod.weight.element_size()
    emb = model.model.embed_tokens.weight
    return total + emb.shape[1] * emb.element_size()


def kv_bytes(model, tokens: float) -> float:
    return kv_bytes_per_token(model.config, model.dtype) * tokens


def run_lowbit(model, prompt, new_tokens):
    eng = Engine(model, None, num_blocks=(len(prompt) + new_tokens) // 16 + 8, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    best = None
    for _ in range(2):  # first run warms up; keep the faster
        eng.add_request(prompt, params)
        out = None
        while eng.has_unfinished():
            for o in eng.step():
                out = o
        torch.cuda.synchronize()
        dt = out.finish_time - out.first_token_time
        rate = (new_tokens - 1) / dt
        best = max(best or 0, rate)
        tokens = out.token_ids
    return best, tokens, eng


KINDS = (("attention", ("paged", "attention", "flash", "fmha", "_decode_kernel", "_merge_kernel")),
         ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "matmul", "wq_", "splitk")))


def step_profile(eng) -> dict:
    """Where a batch-1 decode step's time goes: the GPU time of one graph replay (no Python, no launch
    gaps), and the kernels of one eager step by kind (torch.profiler)."""
    from ceilings import cuda_time
    dec = eng.runner.decoder
    out = {"graph_step_us": cuda_time(dec.graphs[1].replay, iters=20, graph=False) * 1e6}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec._forward(1)
        torch.cuda.synchronize()
    kinds: dict[str, list] = {}
    other: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kind = next((k for k, keys in KINDS if any(s in ev.name.lower() for s in keys)), "other")
            kinds.setdefault(kind, []).append(ev.device_time_total)
            if kind == "other":
                other.setdefault(ev.name[:80], []).append(ev.device_time_total)
    for k, v in kinds.items():
        out[f"{k}_us"], out[f"{k}_kernels"] = sum(v), len(v)
    top = sorted(other.items(), key=lambda kv: -sum(kv[1]))[:8]
    out["other_top"] = [{"kernel": n, "count": len(v), "us": sum(v)} for n, v in top]
    return out


def hf_model(model):
    import transformers
    cfg = model.config
    hcfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k not in ('model_type', 'architectures')})
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(hcfg).to(model.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k], missing
    return hf.eval()


def run_hf(hf, prompt, new_tokens, static: bool, compile_: bool):
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    if compile_:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    best = 0.0
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)  # prefill alone
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = hf.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        # decode rate: (n - 1) tokens in (full time - one prefill's time)
        best = max(best, (new_tokens - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))
    return best, out[0, len(prompt):].tolist(), first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "smollm2"])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--hf", default="static", choices=["none", "eager", "static", "compile"],
                    help="HF baseline: dynamic cache, static cache, or static cache + torch.compile")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_h100"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    bw = copy_bandwidth()
    rows = []
    for shape in args.shapes:
        prompt = random.Random(0).choices(range(100, 30000), k=args.prompt)
        hf_rate = None
        for fmt in args.formats:
            model = random_llama(shape, torch.bfloat16, "cuda")
            if FORMATS[fmt]:
                from lowbit.quant.api import quantize
                quantize(model, "rtn", progress=False, **FORMATS[fmt])
            rate, toks, eng = run_lowbit(model, prompt, args.new)
            per_tok = weight_bytes_per_token(model) + kv_bytes(model, args.prompt + args.new / 2)
            row = dict(shape=shape, format=fmt, tokens_per_s=rate, bytes_per_token=per_tok,
                       achieved_GBps=rate * per_tok / 1e9, fraction_of_copy_bw=rate * per_tok / bw,
                       **step_profile(eng))
            row["step_us"] = 1e6 / rate
            row["graph_fraction_of_copy_bw"] = per_tok / (row["graph_step_us"] / 1e6) / bw
            del eng
            if fmt == "bf16" and args.hf != "none":
                hf = hf_model(model)
                hf_rate, hf_toks, _ = run_hf(hf, prompt, args.new, args.hf in ("static", "compile"),
                                             args.hf == "compile")
                agree = sum(a == b for a, b in zip(toks, hf_toks)) / len(toks)
                rows.append(dict(shape=shape, format=f"bf16 HF transformers ({args.hf})", tokens_per_s=hf_rate,
                                 bytes_per_token=per_tok, achieved_GBps=hf_rate * per_tok / 1e9,
                                 fraction_of_copy_bw=hf_rate * per_tok / bw, greedy_agreement_with_lowbit=agree))
                del hf
            row["speedup_vs_hf_bf16"] = rate / hf_rate if hf_rate else None
            rows.append(row)
            print(row, flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    payload = dict(machine(), copy_GBps=bw / 1e9, prompt=args.prompt, new_tokens=args.new, rows=rows)
    md = [f"# Batch-1 decode ({payload['gpu']}, {payload['date']})", "",
          f"`{payload['command']}`", "",
          f"Prompt {args.prompt} tokens, {args.new} new tokens, greedy; random-initialised weights (std "
          f"1/sqrt(fan_in)). Measured copy bandwidth: {bw / 1e9:.0f} GB/s. Bytes/token = weights read per step "
          "(packed layout for WkA16) + mean KV cache read.", "",
          "| shape | format | tok/s | MB/token | GB/s | of copy BW | vs HF bf16 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = r.get("speedup_vs_hf_bf16")
        md.append(f"| {r['shape']} | {r['format']} | {r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
                  f"{r['achieved_GBps']:.0f} | {r['fraction_of_copy_bw']:.1%} | {'' if sp is None else f'{sp:.2f}x'} |")
    md += ["", "Where a step's time goes (batch 1): `step` = 1 / tok/s as the engine runs; `graph` = GPU time of "
           "one CUDA-graph replay alone (what the step would cost with zero host work between replays); the "
           "kernel columns are one eager step's kernels by kind (torch.profiler), µs (count).", "",
           "| shape | format | step µs | graph µs | host gap µs | graph of copy BW | matmul µs | attention µs | "
           "other µs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "graph_step_us" in r:
            ks = [f"{r.get(k + '_us', 0):.0f} ({r.get(k + '_kernels', 0)})" for k in ("matmul", "attention", "other")]
            md.append(f"| {r['shape']} | {r['format']} | {r['step_us']:.0f} | {r['graph_step_us']:.0f} | "
                      f"{r['step_us'] - r['graph_step_us']:.0f} | {r['graph_fraction_of_copy_bw']:.1%} | "
                      + " | ".join(ks) + " |")
    write_results(Path(args.out), payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
