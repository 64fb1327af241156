"""Serving-engine throughput vs the contiguous batched generator, KV-cache waste, prefix-sharing savings.

CPU: the real default model (SmolLM2). GPU: a random-initialised model at a real shape (--shape), bf16.
    python benchmarks/engine_throughput.py --concurrency 1 8 --max-new 16
    python benchmarks/engine_throughput.py --device cuda --shape llama-1b --concurrency 1 8 32
Writes benchmarks/results/engine_throughput_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from lowbit.atomic import write_json_atomic, write_text_atomic
from lowbit.config import SamplingParams
from lowbit.engine import Engine
from lowbit.generate import generate

from lowbit.models.shapes import SHAPES, random_llama  # noqa: E402


def build_model(args):
    if args.device == "cpu" and args.shape is None:
        from lowbit.models.loader import load
        model, _ = load(None, dtype="fp32", device="cpu")
        return model, "SmolLM2 (real weights, fp32)"
    shape = args.shape or "smollm2"
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = random_llama(shape, dtype, args.device)
    return model, f"{shape} (random init, {str(dtype).split('.')[-1]})"


def make_requests(n, vocab, seed, pmin, pmax, omin, omax, prefix=()):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(pmin, pmax)
        reqs.append((list(prefix) + [rng.randrange(100, vocab) for _ in range(plen)], rng.randint(omin, omax)))
    return reqs


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_engine(model, reqs, block_size, max_num_seqs=256):
    ctx = max(len(p) + o for p, o in reqs)
    num_blocks = sum(-(-(len(p) + o) // block_size) for p, o in reqs) + 4
    eng = Engine(model, None, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs)
    for p, o in reqs:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=o, ignore_eos=True))
    wastes, peak_blocks, toks, probe = [], 0, 0, 0.0
    sync(model.device)
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for out in eng.step():
            toks += len(out.new_token_ids)
        t1 = time.perf_counter()  # the waste probe walks every block table: the benchmark's cost, not the engine's
        st = eng.block_manager.memory_stats()
        if st.slots_allocated:
            wastes.append(st.waste)
        peak_blocks = max(peak_blocks, st.blocks_used)
        probe += time.perf_counter() - t1
    sync(model.device)
    dt = time.perf_counter() - t0 - probe
    # a max-length reservation per request (contiguous cache sized for the longest request)
    reserved = len(reqs) * ctx
    used_final = sum(len(p) + o for p, o in reqs)
    return dict(seconds=dt, output_tokens=toks, tokens_per_s=toks / dt, steps=eng.num_steps,
                waste_mean=sum(wastes) / len(wastes) if wastes else 0.0, waste_max=max(wastes, default=0.0),
                maxlen_reservation_waste_at_end=1 - used_final / reserved,
                peak_blocks=peak_blocks, preemptions=eng.scheduler.num_preemptions)


def run_contiguous(model, reqs):
    """lowbit.generate.generate pads the batch to one prompt length and one max_tokens (its API): it runs
    max(out) steps for everyone; only each request's own output tokens are counted."""
    sync(model.device)
    t0 = time.perf_counter()
    generate(model, None, [p for p, _ in reqs],
             SamplingParams(temperature=0, max_tokens=max(o for _, o in reqs), ignore_eos=True))
    sync(model.device)
    dt = time.perf_counter() - t0
    toks = sum(o for _, o in reqs)
    return dict(seconds=dt, output_tokens=toks, tokens_per_s=toks / dt)


def prefix_sharing(model, n, block_size, args):
    vocab = model.config.vocab_size
    system = random.Random(args.seed + 99).choices(range(100, vocab), k=args.system_len)
    with_sys = make_requests(n, vocab, args.seed + 7, args.prompt_min, args.prompt_max,
                             args.new_min, args.new_max, system)
    # same lengths, but each request's "system prompt" is different
    without = [(random.Random(args.seed + 1000 + i).choices(range(100, vocab), k=args.system_len)
                + p[len(system):], o) for i, (p, o) in enumerate(with_sys)]
    res = {}
    for name, reqs in (("shared_system_prompt", with_sys), ("no_shared_prefix", without)):
        r = run_engine(model, reqs, block_size)
        res[name] = {"peak_blocks": r["peak_blocks"], "tokens_per_s": r["tokens_per_s"]}
    a, b = res["shared_system_prompt"]["peak_blocks"], res["no_shared_prefix"]["peak_blocks"]
    res["blocks_saved"] = b - a
    res["fraction_saved"] = (b - a) / b if b else 0.0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="random-init model of this shape (default on CPU: the real SmolLM2)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=128)
    ap.add_argument("--new-min", type=int, default=None, help="default: max-new // 2")
    ap.add_argument("--max-new", type=int, default=128, help="the largest output length drawn")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--system-len", type=int, default=256, help="common system prompt for the sharing test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.new_max = args.max_new
    args.new_min = args.new_min or max(1, args.max_new // 2)
    torch.set_grad_enabled(False)
    model, desc = build_model(args)
    dev = model.device
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    warm = make_requests(2, model.config.vocab_size, 12345, 8, 8, 2, 2)
    run_engine(model, warm, args.block_size)
    run_contiguous(model, warm)
    rows = []
    for c in args.concurrency:
        reqs = make_requests(c, model.config.vocab_size, args.seed + c, args.prompt_min, args.prompt_max,
                             args.new_min, args.new_max)
        e, g = run_engine(model, reqs, args.block_size), run_contiguous(model, reqs)
        rows.append(dict(concurrency=c, engine=e, contiguous=g, speedup=e["tokens_per_s"] / g["tokens_per_s"]))
        print(f"c={c:3d} engine {e['tokens_per_s']:8.1f} tok/s | contiguous {g['tokens_per_s']:8.1f} tok/s | "
              f"waste mean {e['waste_mean']:.3f} (max-len reservation: {e['maxlen_reservation_waste_at_end']:.3f})",
              flush=True)
    share = prefix_sharing(model, max(args.concurrency), args.block_size, args)
    print(f"prefix sharing ({max(args.concurrency)} reqs, {args.system_len}-token system prompt): "
          f"{share['shared_system_prompt']['peak_blocks']} vs {share['no_shared_prefix']['peak_blocks']} "
          f"peak blocks ({share['fraction_saved']:.1%} saved)", flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result = dict(device=devname, model=desc, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  command=cmd, torch=torch.__version__, args=vars(args), throughput=rows, prefix_sharing=share)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"engine_throughput_{dev.type}"
    write_json_atomic(stem.with_suffix(".json"), result)
    md = ["# Engine throughput\n", f"- device: {devname}", f"- model: {desc}", f"- date: {result['date']}",
          f"- command: `{cmd}`", f"- prompts {args.prompt_min}-{args.prompt_max} tokens, outputs "
          f"{args.new_min}-{args.new_max} tokens (seeded), greedy, block size {args.block_size}\n",
          "| concurrent | engine tok/s | contiguous tok/s | engine/contig | KV waste mean (paged) | max | "
          "waste of max-len reservation | preemptions |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, g = r["engine"], r["contiguous"]
        md.append(f"| {r['concurrency']} | {e['tokens_per_s']:.1f} | {g['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                  f"{e['waste_mean']:.3f} | {e['waste_max']:.3f} | {e['maxlen_reservation_waste_at_end']:.3f} | "
                  f"{e['preemptions']} |")
    md += ["", f"Prefix sharing ({max(args.concurrency)} requests, {args.system_len}-token common system prompt): "
           f"peak blocks {share['shared_system_prompt']['peak_blocks']} with vs "
           f"{share['no_shared_prefix']['peak_blocks']} without ({share['blocks_saved']} blocks, "
           f"{share['fraction_saved']:.1%} saved).", "",
           "Contiguous = `lowbit.generate.generate` on the same requests as one padded batch (it runs "
           "max(output length) steps; only each request's own tokens are counted). Max-len reservation waste "
           "= 1 - sum(prompt+output) / (requests x longest prompt+output)."]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
