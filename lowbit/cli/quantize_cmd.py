"""`lowbit quantize`: run a registered method over the model block by block and save the result."""
from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli.common import add_model_arg, console

# CLI flag -> method config field; a flag is passed on only when given, and only to methods that take it.
METHOD_FLAGS = {
    "bits": dict(type=int, help="weight bits 2..8"),
    "group_size": dict(type=int, help="-1 per output channel, 0 per tensor, N groups of N inputs"),
    "sym": dict(action=argparse.BooleanOptionalAction, help="symmetric grid (no zero point); --no-sym for asymmetric"),
    "zero_point": dict(choices=["int", "float"], help="asymmetric offset: integer zero point or real minimum"),
    "observer": dict(help="range observer: minmax | percentile | mse | kl"),
    "act_scheme": dict(choices=["dynamic", "static"], help="activation scales: per-token dynamic or static"),
    "act_order": dict(action=argparse.BooleanOptionalAction, help="GPTQ: columns by descending Hessian diagonal"),
    "true_sequential": dict(action=argparse.BooleanOptionalAction,
                            help="GPTQ: attention first, MLP statistics from the quantized attention (default on)"),
    "mse_clip": dict(action=argparse.BooleanOptionalAction, help="GPTQ: MSE-optimal grid ranges"),
    "percdamp": dict(type=float, help="GPTQ: dampening as a fraction of the mean Hessian diagonal"),
    "alpha": dict(help="SmoothQuant migration strength in [0, 1], or 'auto' to search it"),
    "clip": dict(action=argparse.BooleanOptionalAction, help="AWQ: weight-clipping search (default on)"),
    "n_grid": dict(type=int, help="AWQ: grid points for the scale exponent"),
    "threshold": dict(type=float, help="LLM.int8(): |x| >= threshold marks an outlier feature (default 6.0)"),
    "act_bits": dict(type=int, help="ZeroQuant: activation bits (8 per-token dynamic, 16 none)"),
    "lkd_steps": dict(type=int, help="ZeroQuant: layer-wise distillation steps per block (0 = off)"),
    "lkd_lr": dict(type=float, help="ZeroQuant: LKD Adam learning rate"),
    "attn_bits": dict(type=int, help="ZeroQuant: weight bits of the attention projections (default: --bits)"),
    "lkd_inputs": dict(choices=["quantized", "float"], help="ZeroQuant: LKD block inputs (default quantized)"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a registered method and save it",
                       description="Quantize the decoder blocks' Linears one block at a time and write a "
                                   "directory (safetensors + versioned quantization config + tokenizer).")
    add_model_arg(p)
    p.add_argument("--method", default="rtn", help="registered method name (default rtn)")
    for name, kw in METHOD_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, **({"default": None} | kw))
    p.add_argument("--calib", help="calibration text file (e.g. ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the tensors no method quantizes (embeddings, norms, an untied head; default fp16)")
    p.set_defaults(run=run)


def run(args) -> int:
    from lowbit.errors import LowbitError
    from lowbit.models.loader import load
    from lowbit.quant.api import calibration_windows, quantize
    from lowbit.quant.registry import get_method, method_options

    method_name = args.method
    allowed = method_options(method_name)
    opts = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k) is not None}
    bad = sorted(set(opts) - allowed) if allowed else []
    if bad:
        raise LowbitError(f"--{bad[0].replace('_', '-')} does not apply to --method {method_name}")
    method = get_method(method_name, **opts)
    if Path(args.out).exists() and not args.force:
        raise LowbitError(f"-o {args.out}: already exists (pass --force to replace it)")
    model, tok = load(args.model, dtype=args.dtype, device=args.device)
    calib = None
    if args.calib:
        calib = calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed)
    elif method.needs_calibration:
        raise LowbitError(f"--method {method_name} needs calibration data: pass --calib FILE")
    result = quantize(model, method, calib, device=args.device)
    out = result.save(model, tok, args.out, overwrite=args.force, kv_cache=args.kv_cache,
                      save_dtype=args.save_dtype)
    result.print(console())
    console().print(f"saved {out}")
    return 0
