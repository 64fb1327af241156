"""Training-side compression on the real default model: QAT (STE / LSQ), LLM-QAT (self-generated data) and
knowledge distillation, each scored against the base on WikiText-2 test next to the PTQ rows it must beat,
in the same run (issue [5/6]).

    python benchmarks/train_table.py --part qat --out benchmarks/results/train_table      # on the H200
    python benchmarks/train_table.py --part distill --out benchmarks/results/train_table
    python benchmarks/train_table.py --part qat --quick --out /tmp/tt                     # CPU smoke run

Rows are appended to OUT/<part>.json as they finish (a rerun skips rows already there) and OUT/<part>.md is
rewritten each time. Training text: WikiText-2 valid (the only split here besides test); evaluation:
WikiText-2 test, every 2048-token window (147), fp32 without TF32.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; on the GPU machine the files travel as shared/ inside it (carry)
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data") if p.is_dir()),
              ROOT.parent / "shared" / "data")
VALID, TEST = SHARED / "wikitext-2" / "valid.txt", SHARED / "wikitext-2-raw" / "wiki.test.raw"

# name -> (kind, options); kind: ptq (method name in options) | qat | llm-qat | distill | student
QAT_ROWS = {   # in the order a time-limited run should reach them
    "qat-w4-g128": ("qat", dict(bits=4, group_size=128)),
    "qat-w3-g128": ("qat", dict(bits=3, group_size=128)),
    "llm-qat-w4-g128 (self data)": ("llm-qat", dict(bits=4, group_size=128)),
    "awq-w4-g128": ("ptq", dict(method="awq", bits=4, group_size=128)),
    "gptq-w3-g128": ("ptq", dict(method="gptq", bits=3, group_size=128)),
    "rtn-w4-g128": ("ptq", dict(method="rtn", bits=4, group_size=128)),
    "rtn-w3-g128": ("ptq", dict(method="rtn", bits=3, group_size=128)),
    "llm-qat-w3-g128 (self data)": ("llm-qat", dict(bits=3, group_size=128)),
    "qat-w4-g128-lsq": ("qat", dict(bits=4, group_size=128, learn_scales=True)),
    "qat-w3-g128-lsq": ("qat", dict(bits=3, group_size=128, learn_scales=True)),
}
DISTILL_ROWS = {
    "student-15 untrained (every other block)": ("student", dict()),
    "student-15 ce (baseline)": ("distill", dict(mode="ce")),
    "student-15 white (KL)": ("distill", dict(mode="white")),
    "student-15 white (KL + hidden MSE)": ("distill", dict(mode="white", feature_loss=True)),
    "student-15 white (reverse KL)": ("distill", dict(mode="white", reverse_kl=True)),
    "student-15 black (teacher text, CE)": ("distill", dict(mode="black")),
}


def _machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_row(kind: str, opts: dict, base, tok, args, device: str):
    """A fresh copy of the base made into this row's model -> (model, extra info)."""
    from lowbit.quant.api import calibration_windows, quantize
    from lowbit.train.distill import DistillConfig, run_distill, shallow_copy
    from lowbit.train.qat import QATConfig, run_qat

    opts = dict(opts)
    if kind == "ptq":
        model = copy.deepcopy(base)
        calib = calibration_windows(tok, VALID, args.nsamples, args.calib_seqlen, seed=0)
        res = quantize(model, opts.pop("method"), calib, device=device, progress=False, **opts)
        return model, {"calibration": calib.describe(), "quantize_s": round(res.report.seconds, 1)}
    if kind in ("qat", "llm-qat"):
        model = copy.deepcopy(base)
        cfg = QATConfig(steps=args.steps, lr=args.qat_lr, batch_size=args.batch, seqlen=args.seqlen,
                        self_samples=args.self_samples, **opts)
        log, data = run_qat(model, tok, cfg, "self" if kind == "llm-qat" else str(VALID), device=device)
        return model, {"config": cfg.to_dict(), "data": data, "training": log.to_dict()}
    student = shallow_copy(base, list(range(0, base.config.num_layers, 2)))
    if kind == "student":
        return student, {"blocks": student.block_map}
    cfg = DistillConfig(steps=args.steps, lr=args.distill_lr, batch_size=args.batch, seqlen=args.seqlen,
                        black_samples=args.black_samples, **opts)
    log, data = run_distill(base, student, tok, cfg, str(VALID), device=device)
    return student, {"config": cfg.to_dict(), "data": data, "training": log.to_dict(), "blocks": student.block_map}


def table(rows: dict, meta: dict) -> str:
    lines = [f"# {meta['title']}", "", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             *(f"- command: `{c}`" for c in meta["commands"]), f"- {meta['protocol']}", "",
             "| row | PPL | ΔPPL | KL | top-1 | train s | steps × batch × seqlen |", "|---|---:|---:|---:|---:|---:|---|"]
    base = rows.get("base", {}).get("perplexity")
    for name, r in rows.items():
        tr = r.get("training", {})
        shape = (f"{tr['steps']} × {r['config']['batch_size']} × {r['config']['seqlen']}" if tr else
                 (f"calib {r['calibration']['nsamples']} × {r['calibration']['seqlen']}" if "calibration" in r else ""))
        d = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else ""
        kl = f"{r['kl']:.4f}" if "kl" in r else ""
        top1 = f"{100 * r['top1_agreement']:.2f}%" if "top1_agreement" in r else ""
        secs = r.get("train_s", "")
        lines.append(f"| {name} | {r['perplexity']:.3f} | {d} | {kl} | {top1} | {secs} | {shape} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["qat", "distill"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", help="comma-separated row names (default: all of the part)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--qat-lr", type=float, default=5e-5)
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--self-samples", type=int, default=1024)
    ap.add_argument("--black-samples", type=int, default=1024)
    ap.add_argument("--nsamples", type=int, default=128, help="PTQ calibration windows (the methods table's 128)")
    ap.add_argument("--calib-seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="test windows (default all 147)")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script on a CPU")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seqlen, args.self_samples, args.black_samples = 2, 1, 32, 2, 2
        args.nsamples, args.calib_seqlen, args.windows = 2, 64, args.windows or 1

    from lowbit.eval.perplexity import evaluate
    from lowbit.models.loader import load
    from lowbit.text import eval_windows, read_text, tokenize_text

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / f"{args.part}.json"
    state = json.loads(res_path.read_text()) if res_path.exists() else {"rows": {}}
    rows = state["rows"]
    all_rows = QAT_ROWS if args.part == "qat" else DISTILL_ROWS
    names = args.rows.split(",") if args.rows else list(all_rows)
    base, tok = load(None, device=device)
    windows = eval_windows(tokenize_text(tok, read_text(TEST)), 2048 if not args.quick else 64, args.windows)
    meta = {"title": f"Training-side compression ({args.part}), SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 dequantized)",
            "machine": _machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commands": state.get("meta", {}).get("commands", []) + [
                "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:] if argv is None else argv)],
            "protocol": f"WikiText-2 test, {windows.shape[0]} windows of {windows.shape[1]} tokens, fp32 (no TF32); "
                        f"training text WikiText-2 valid; KL and top-1 against the base on the same windows"}
    if "base" not in rows:
        r = evaluate(base, windows, progress=False)
        rows["base"] = r.to_dict()
    for name in names:
        if name in rows:
            continue
        kind, opts = all_rows[name]
        t0 = time.perf_counter()
        model, info = run_row(kind, opts, base, tok, args, device)
        secs = time.perf_counter() - t0
        r = evaluate(model.to(device).float(), windows, base=base, progress=False)
        rows[name] = {**r.to_dict(), **info, "train_s": round(secs, 1)}
        print(f"{name}: ppl {r.perplexity:.3f} kl {r.kl:.4f} ({secs:.0f} s)", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        state.update(meta=meta)
        res_path.write_text(json.dumps(state, indent=2))
        (out / f"{args.part}.md").write_text(table(rows, meta))
    state.update(meta=meta)
    res_path.write_text(json.dumps(state, indent=2))
    (out / f"{args.part}.md").write_text(table(rows, meta))
    print(table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
