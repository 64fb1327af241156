"""Speculative decoding: acceptance rate and speed-up over plain target generation (greedy).

Drafts: the target cut to its first N blocks (shares embeddings, head and tokenizer), and an RTN 4-bit
quantized copy of the whole target. Each prompt is generated greedily by the target alone
(lowbit.generate) and speculatively with each draft; decode tokens/s are compared on the same prompts.

    python benchmarks/speculative.py --blocks 4 8 --k 4 --max-tokens 64
    python benchmarks/speculative.py --device cuda --dtype bf16 --no-rtn
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch

from lowbit.atomic import write_json_atomic, write_text_atomic

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):", "The three laws of thermodynamics state that"]


def cut(model, n: int):
    d = copy.deepcopy(model)
    d.model.layers = d.model.layers[:n]
    d.config = copy.deepcopy(d.config)
    d.config.num_layers = n
    return d


def main() -> None:
    from lowbit.config import SamplingParams
    from lowbit.engine.speculative import speculative_generate
    from lowbit.generate import encode_prompt, generate
    from lowbit.models.loader import default_model_path, load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the default SmolLM2)")
    ap.add_argument("--shape", default=None, help="random-initialised weights at a named shape (GPU speed runs; "
                    "prompts are random token ids, so acceptance says little about a trained model)")
    ap.add_argument("--blocks", type=int, nargs="*", default=[4, 8], help="N for the first-N-blocks drafts")
    ap.add_argument("--no-rtn", action="store_true", help="skip the RTN-quantized drafts")
    ap.add_argument("--rtn", nargs="*", default=["4:32:float", "4:128"],
                    help="RTN drafts as BITS:GROUP[:float] (float: GGUF Q4_1's real-valued zero point)")
    ap.add_argument("--k", type=int, nargs="*", default=[4])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()

    if a.shape:
        import random

        from lowbit.models.shapes import random_llama
        path, tok = f"random {a.shape}", None
        target = random_llama(a.shape, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype, torch.float32),
                              a.device)
        rng = random.Random(0)
        prompts = [[rng.randrange(100, target.config.vocab_size) for _ in range(32)] for _ in PROMPTS[:a.prompts]]
    else:
        path = Path(a.model) if a.model else default_model_path()
        target, tok = load(path, dtype=a.dtype, device=a.device)
        prompts = [encode_prompt(tok, p) for p in PROMPTS[:a.prompts]]
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)

    drafts = {f"first{n}blocks": cut(target, n) for n in a.blocks}
    from lowbit.quant.api import quantize
    for spec in ([] if a.no_rtn else a.rtn):
        bits, group, *zp = spec.split(":") + ([] if spec.count(":") else [""])
        if not (bits.isdigit() and group.lstrip("-").isdigit() and zp in ([], ["float"], ["int"])):
            sys.exit(f"error: --rtn {spec!r}: expected BITS:GROUP[:float|int], e.g. 4:128 or 4:32:float")
        rtn = copy.deepcopy(target)
        quantize(rtn, "rtn", None, bits=int(bits), group_size=int(group), zero_point=(zp or ["int"])[0],
                 progress=False)
        drafts[f"rtn{bits}_g{group}" + ("_floatzero" if zp == ["float"] else "")] = rtn

    generate(target, tok, [prompts[0]], SamplingParams(temperature=0, max_tokens=4))       # warm-up
    base_tok = base_s = 0.0
    refs = []
    for ids in prompts:
        outs, st = generate(target, tok, [ids], params)
        refs.append(outs[0].token_ids)
        base_tok += st.decode_steps + 1      # decode steps + the token sampled from the prefill logits
        base_s += st.prefill_seconds + st.decode_seconds
    base_tps = base_tok / base_s
    rows = []
    for name, d in drafts.items():
        for k in a.k:
            prop = acc = tf = df = ntok = 0
            secs = 0.0
            match = True
            for ids, ref in zip(prompts, refs):
                out, st = speculative_generate(target, d, tok, ids, params, k=k)
                prop, acc, tf, df = prop + st.proposed, acc + st.accepted, tf + st.target_forwards, df + st.draft_forwards
                ntok += st.new_tokens
                secs += st.wall_seconds
                match &= out.token_ids == ref
            tps = ntok / secs
            rows.append(dict(draft=name, k=k, acceptance_rate=acc / prop if prop else 0.0, proposed=prop,
                             accepted=acc, target_forwards=tf, draft_forwards=df, new_tokens=ntok,
                             tokens_per_target_forward=ntok / tf, tokens_per_s=tps, speedup=tps / base_tps,
                             greedy_matches_target=match))
            print(f"{name:>14} k={k}: accept {rows[-1]['acceptance_rate']:.1%} | "
                  f"{rows[-1]['tokens_per_target_forward']:.2f} tok/target fwd | {tps:.1f} tok/s "
                  f"vs {base_tps:.1f} = x{tps / base_tps:.2f} | greedy match {match}", flush=True)

    now = datetime.datetime.now()
    res = dict(date=now.isoformat(timespec="seconds"), machine=f"{platform.node()} {platform.processor() or platform.machine()}",
               device=a.device, torch=torch.__version__, threads=torch.get_num_threads(),
               command="python " + " ".join(sys.argv), model=str(path), dtype=a.dtype,
               max_tokens=a.max_tokens, prompts=len(prompts), baseline_tokens_per_s=base_tps,
               timing_note="tokens/s = new tokens / (prefill + decode) wall seconds, summed over prompts",
               rows=rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speculative_{a.device}_{now:%Y%m%d_%H%M%S}"
    write_json_atomic(stem.with_suffix(".json"), res)
    md = [f"# Speculative decoding ({a.device}, {a.dtype})", "",
          f"- date: {res['date']}", f"- machine: {res['machine']} (torch {res['torch']}, {res['threads']} threads)",
          f"- command: `{res['command']}`", f"- greedy, {a.max_tokens} new tokens x {len(prompts)} prompts; "
          f"target alone: {base_tps:.1f} tok/s", "",
          "| draft | k | acceptance | tok / target fwd | tok/s | speed-up | greedy == target |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['draft']} | {r['k']} | {r['acceptance_rate']:.1%} | {r['tokens_per_target_forward']:.2f} | "
           f"{r['tokens_per_s']:.1f} | x{r['speedup']:.2f} | {r['greedy_matches_target']} |" for r in rows]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
