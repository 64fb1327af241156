"""`lowbit eval`: perplexity (GPTQ protocol), and KL / top-1 agreement against a base model."""
from __future__ import annotations

import math
from pathlib import Path

from lowbit.atomic import write_json_atomic
from lowbit.cli.common import console, model_command

DEFAULT_BASE = "<default model>"


def add_parser(sub) -> None:
    p = model_command(sub, "eval", help="perplexity, and KL / top-1 agreement against --base",
                       description="Perplexity with the GPTQ paper's protocol: the text tokenized once "
                                   "without special tokens (no BOS), cut into non-overlapping windows of "
                                   "--seqlen (tail dropped), mean next-token NLL over all predicted tokens.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a text file (read with universal newlines)")
    src.add_argument("--dataset", help="wikitext2 | ptb, through the `datasets` package (needs network)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first K windows (default all)")
    p.add_argument("--base", nargs="?", const=DEFAULT_BASE, metavar="BASE_MODEL",
                   help="compare against a base model (bare --base: the default model): ΔPPL, KL, top-1 agreement")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from rich.table import Table

    from lowbit.errors import LowbitError
    from lowbit.eval.memory import model_bytes
    from lowbit.eval.perplexity import evaluate
    from lowbit.text import eval_windows, load_dataset_text, read_text, tokenize_text
    from lowbit.models.loader import load

    if not args.text and not args.dataset:
        raise LowbitError("eval needs --text FILE or --dataset NAME")
    text = read_text(args.text) if args.text else load_dataset_text(args.dataset)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache,
                      strict=args.strict)
    base_path = None if args.base == DEFAULT_BASE else args.base
    base = load(base_path, dtype=args.dtype, device=args.device, tokenizer=False,
                strict=args.strict)[0] if args.base else None
    if base is not None and base.config.vocab_size != model.config.vocab_size:
        raise LowbitError(f"--base {args.base}: vocab {base.config.vocab_size} differs from the model's "
                          f"{model.config.vocab_size}; KL needs the same tokenizer")
    windows = eval_windows(tokenize_text(tok, text), args.seqlen, args.windows)
    res = evaluate(model, windows, base=base, progress=not args.no_progress)
    out = res.to_dict()
    out.update(model=getattr(model, "source", args.model), text=args.text or args.dataset,
               kv_cache=model.kv_quant.dtype if model.kv_quant else None,
               dtype=args.dtype, bos=False, seconds_per_window=res.seconds / res.windows,
               model_bytes=model_bytes(model))

    t = Table(title=f"eval: {Path(str(out['model'])).name}", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("perplexity", f"{res.perplexity:.4f}")
    if res.base_perplexity is not None:
        t.add_row("base perplexity", f"{res.base_perplexity:.4f}")
        t.add_row("ΔPPL", f"{res.perplexity - res.base_perplexity:+.4f} "
                          f"({100 * (res.perplexity / res.base_perplexity - 1):+.2f}%)")
        t.add_row("KL(base‖model) / token", f"{res.kl:.5f}")
        t.add_row("top-1 agreement", f"{100 * res.top1_agreement:.2f}%")
    t.add_row("mean NLL (nats)", f"{res.nll:.5f}")
    t.add_row("windows × seqlen", f"{res.windows} × {res.seqlen}")
    t.add_row("predicted tokens", f"{res.tokens:,}")
    t.add_row("model bytes", f"{out['model_bytes'] / 1e6:.1f} MB")
    t.add_row("seconds", f"{res.seconds:.1f} ({out['seconds_per_window']:.2f} s/window)")
    console().print(t)
    if not math.isfinite(res.perplexity):
        console().print("[yellow]warning: perplexity is not finite[/]")
    if args.json:
        write_json_atomic(args.json, out)
    return 0

