"""`lowbit compare`: several methods and bit widths on one model -> table (markdown + JSON) and a plot."""
from __future__ import annotations

import datetime
import platform
import sys

from lowbit.cli.common import console, model_command


def add_parser(sub) -> None:
    p = model_command(sub, "compare", help="compare quantization methods: PPL, KL, top-1, bytes, time, memory",
                       description="Quantize the model with every METHOD × BITS × GROUP-SIZE, evaluate all of them "
                                   "against the base on the same windows (one pass), and write compare.md, "
                                   "compare.json and compare.png (perplexity vs bits per weight) to --out.")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated registered methods (default rtn,gptq)")
    p.add_argument("--bits", default="4,3", help="comma-separated weight bits for methods that take them")
    p.add_argument("--group-size", default="-1,128", help="comma-separated group sizes (-1 per channel)")
    p.add_argument("--sym", action="store_true", help="symmetric grids for the weight methods")
    p.add_argument("--text", default=None, help="evaluation text (default ../shared WikiText-2 test if present)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first K windows only (default all)")
    p.add_argument("--calib", default=None, help="calibration text for methods that need it")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=None, help="stop scoring after this long (resumable)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run)


def _ints(s: str, flag: str) -> list[int]:
    from lowbit.errors import LowbitError
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise LowbitError(f"{flag}: expected comma-separated integers, got {s!r}") from None


def candidates(methods: list[str], bits: list[int], groups: list[int], sym: bool):
    """Every method × bits × group size that applies to the method (a method without bits: one run)."""
    from lowbit.compare import Candidate
    from lowbit.quant.registry import get_method, method_options

    out = []
    for m in methods:
        opts = method_options(m)
        if not opts:
            get_method(m)  # raises the clear unknown-method error
        if "bits" not in opts:
            out.append(Candidate(m, m, {}))
            continue
        for b in bits:
            for g in (groups if "group_size" in opts else [None]):
                o = {"bits": b} | ({"group_size": g} if g is not None else {}) | ({"sym": True} if sym else {})
                gname = "" if g is None else ("-ch" if g == -1 else f"-g{g}")
                out.append(Candidate(f"{m}-w{b}{gname}", m, o))
    for c in out:
        get_method(c.method, **c.options)  # validate every combination before any work
    return out


def run(args) -> int:
    from pathlib import Path

    from lowbit.errors import LowbitError
    from lowbit import compare
    from lowbit.text import eval_windows, read_text, tokenize_text
    from lowbit.models.loader import load
    from lowbit.quant.api import calibration_windows

    cands = candidates([m for m in args.methods.split(",") if m], _ints(args.bits, "--bits"),
                       _ints(args.group_size, "--group-size"), args.sym)
    text = args.text or str(Path(__file__).resolve().parents[2].parent / "shared/data/wikitext-2-raw/wiki.test.raw")
    model, tok = load(args.model, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache,
                      strict=args.strict)
    windows = eval_windows(tokenize_text(tok, read_text(text)), args.seqlen, args.windows)
    calib = None
    if any(compare_needs_calib(c) for c in cands):
        if not args.calib:
            raise LowbitError("--calib FILE is needed by " + ", ".join(c.name for c in cands if compare_needs_calib(c)))
        calib = calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed)
    meta = {"model": Path(str(getattr(model, "source", "default"))).name, "text": text,
            "calibration": calib.describe() if calib else None,
            "machine": f"{platform.node()} {platform.machine()}, torch {__import__('torch').__version__}",
            "date": datetime.date.today().isoformat(), "command": "lowbit " + " ".join(sys.argv[1:])}
    state = compare.run(model, cands, windows, calib, args.out, f"{meta['model']}: quantization methods", meta,
                        budget_s=60 * args.budget_minutes if args.budget_minutes else None, device=args.device)
    console().print(compare.markdown(state, "results"))
    png = ", compare.png" if compare.can_plot() else f" (no compare.png: matplotlib is missing; {compare.PLOT_INSTALL})"
    console().print(f"wrote {args.out}/compare.md, compare.json{png}")
    return 0


def compare_needs_calib(c) -> bool:
    from lowbit.quant.registry import get_method
    return get_method(c.method, **c.options).needs_calibration
