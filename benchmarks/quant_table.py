"""Quantization accuracy table on the real default model: PPL, ΔPPL, KL, top-1 agreement, model bytes.

All configurations are evaluated in ONE pass over the windows: the base model's logits are computed once
per window and every quantized model is compared against them. Progress is saved after every window in a
state file, so a run cut short (`--budget-minutes`) resumes where it stopped; the table always says how
many windows each number covers.

    python benchmarks/quant_table.py --budget-minutes 60            # resumable; run again to continue
    python benchmarks/quant_table.py --configs base,rtn-w4-g128 --windows 8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# name -> (method, options); "base" is the unquantized model.
CONFIGS: dict[str, tuple[str, dict]] = {
    "rtn-w8-ch": ("rtn", dict(bits=8, group_size=-1, sym=True)),
    "rtn-w4-ch-sym": ("rtn", dict(bits=4, group_size=-1, sym=True)),
    "rtn-w4-ch-asym": ("rtn", dict(bits=4, group_size=-1, sym=False)),
    "rtn-w4-g128-sym": ("rtn", dict(bits=4, group_size=128, sym=True)),
    "rtn-w4-g128-asym": ("rtn", dict(bits=4, group_size=128, sym=False)),
    "rtn-w3-ch-sym": ("rtn", dict(bits=3, group_size=-1, sym=True)),
    "rtn-w3-ch-asym": ("rtn", dict(bits=3, group_size=-1, sym=False)),
    "rtn-w3-g128-sym": ("rtn", dict(bits=3, group_size=128, sym=True)),
    "rtn-w3-g128-asym": ("rtn", dict(bits=3, group_size=128, sym=False)),
    "rtn-w4-g32-asym-float (=Q4_1)": ("rtn", dict(bits=4, group_size=32, sym=False, zero_point="float")),
    "rtn-w4-g32-asym-int": ("rtn", dict(bits=4, group_size=32, sym=False, zero_point="int")),
    "w8a8-dynamic": ("w8a8", dict(act_scheme="dynamic")),
    "w8a8-static": ("w8a8", dict(act_scheme="static")),
    "fp8-dynamic": ("fp8", dict(act_scheme="dynamic")),
}


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _model_bytes(model) -> int:
    from lowbit.cli.eval_cmd import model_bytes
    return model_bytes(model)


def build_models(base, tok, names, args):
    from lowbit.quant.api import calibration_windows, quantize
    from lowbit.quant.registry import get_method

    calib = None
    models, info = {}, {}
    for name in names:
        method, opts = CONFIGS[name]
        m = get_method(method, **opts)
        if m.needs_calibration and calib is None:
            calib = calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed)
        q = copy.deepcopy(base)
        t0 = time.perf_counter()
        res = quantize(q, m, calib if m.needs_calibration else None, progress=False)
        info[name] = {"method": m.describe(), "quantize_seconds": time.perf_counter() - t0,
                      "model_bytes": _model_bytes(q),
                      "calibration": calib.describe() if m.needs_calibration else None,
                      "linear_bytes_ratio": sum(r.stored_bytes for r in res.report.layers)
                      / sum(r.fp16_bytes for r in res.report.layers)}
        models[name] = q
        print(f"  built {name} in {info[name]['quantize_seconds']:.1f}s", file=sys.stderr)
    return models, info


def render(state: dict) -> str:
    b = state["results"]["base"]
    base_ppl = math.exp(b["nll"] / b["tokens"])
    lines = [f"# Quantization accuracy: {state['model']}", "",
             f"- text: `{state['text']}`, seqlen {state['seqlen']}, windows evaluated: see column (of {state['total_windows']})",
             f"- calibration (static W8A8 only): `{state['calib']}`, {state['nsamples']} × {state['calib_seqlen']}, seed {state['seed']}",
             f"- machine: {state['machine']}; date {state['date']}",
             f"- command: `{state['command']}`",
             "- baseline = the GGUF weights dequantized to fp32 (the file stores Q4_1 linears, Q8_0 embeddings)", "",
             "| config | PPL | ΔPPL | ΔPPL % | KL (nats/token) | top-1 agree | model bytes | linear bytes / fp16 | windows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in state["results"].items():
        if not r["windows"]:
            continue
        ppl = math.exp(r["nll"] / r["tokens"])
        bppl = math.exp(r["base_nll"] / r["tokens"]) if name != "base" else ppl
        info = state["info"].get(name, {})
        kl = f"{r['kl'] / r['tokens']:.5f}" if name != "base" else "0"
        top1 = f"{100 * r['top1'] / r['tokens']:.2f}%" if name != "base" else "100%"
        ratio = f"{info['linear_bytes_ratio']:.3f}" if "linear_bytes_ratio" in info else "1.000 (fp16)"
        lines.append(f"| {name} | {ppl:.3f} | {ppl - bppl:+.3f} | {100 * (ppl / bppl - 1):+.2f}% | {kl} | {top1} | "
                     f"{info.get('model_bytes', state['base_bytes']) / 1e6:.1f} MB | {ratio} | {r['windows']} |")
    lines += ["", f"Base perplexity over the windows evaluated: {base_ppl:.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--calib", default=str(SHARED / "wikitext-2" / "valid.txt"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="stop after this many windows (default all)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    ap.add_argument("--budget-minutes", type=float, default=None, help="stop (resumably) after this long")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_table"))
    args = ap.parse_args()

    from lowbit.eval.perplexity import window_stats
    from lowbit.eval.text import eval_windows, read_text, tokenize_text
    from lowbit.models.loader import load

    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_suffix(".state.json")
    names = [n for n in args.configs.split(",") if n and n != "base"]
    for n in names:
        if n not in CONFIGS:
            sys.exit(f"error: --configs: unknown config {n!r} (known: {', '.join(CONFIGS)})")
    base, tok = load(args.model)
    windows = eval_windows(tokenize_text(tok, read_text(args.text)), args.seqlen, args.windows)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("seqlen") not in (None, args.seqlen) or state.get("text") not in (None, args.text):
        sys.exit(f"error: {state_path} was made with other --text/--seqlen; move it away to start over")
    state.update(model=Path(getattr(base, "source", "default")).name, text=args.text, seqlen=args.seqlen,
                 total_windows=int(windows.shape[0]), calib=args.calib, nsamples=args.nsamples,
                 calib_seqlen=args.calib_seqlen, seed=args.seed, base_bytes=_model_bytes(base),
                 machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                 date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv))
    results = state.setdefault("results", {})
    for n in ["base", *names]:
        results.setdefault(n, {"windows": 0, "tokens": 0, "nll": 0.0, "base_nll": 0.0, "kl": 0.0, "top1": 0.0})
    models, info = build_models(base, tok, names, args)
    state.setdefault("info", {}).update(info)

    for w in range(windows.shape[0]):
        pending = [n for n in ["base", *names] if results[n]["windows"] == w]
        if not pending:
            continue
        if args.budget_minutes and time.perf_counter() - t_start > 60 * args.budget_minutes:
            print(f"budget reached at window {w}; run again to continue", file=sys.stderr)
            break
        t0 = time.perf_counter()
        ids = windows[w: w + 1]
        with torch.inference_mode():
            base_logits = base(ids)[0, :-1]
            for n in pending:
                logits = base_logits if n == "base" else models[n](ids)[0, :-1]
                s = window_stats(logits, ids[0, 1:], base_logits)
                r = results[n]
                r["windows"] += 1
                r["tokens"] += ids.shape[1] - 1
                r["nll"] += s["nll"]
                r["base_nll"] += s["base_nll"]
                r["kl"] += s["kl"]
                r["top1"] += s["top1"]
        _atomic_json(state_path, state)
        print(f"window {w + 1}/{windows.shape[0]}: {len(pending)} models in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
    _atomic_json(out.with_suffix(".json"), state)
    out.with_suffix(".md").write_text(render(state))
    print(render(state))


if __name__ == "__main__":
    main()
