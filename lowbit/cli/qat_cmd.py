"""`lowbit qat`: quantization-aware training (STE / LSQ; LLM-QAT with --data self) to a quantized checkpoint."""
from __future__ import annotations

from pathlib import Path

from lowbit.cli.common import add_format_arg, add_model_arg, check_out_free, console


def add_parser(sub) -> None:
    from lowbit.quant.options import add_config_flags
    from lowbit.train.qat import QATConfig

    p = sub.add_parser("qat", help="quantization-aware training to a quantized checkpoint",
                       description="Fine-tune the decoder blocks' Linears through fake quantization (straight-"
                                   "through gradients) to match the float model's logits, then save the "
                                   "quantized layers PTQ would write. --data self is LLM-QAT: the float model "
                                   "generates its own training sequences.")
    add_model_arg(p)
    p.add_argument("--data", required=True, help="training text file, or 'self' (LLM-QAT's generated data)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_format_arg(p)
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the unquantized tensors (embeddings, norms; default fp16)")
    add_config_flags(p.add_argument_group("training options"), QATConfig, skip=("kv_cache",))
    p.set_defaults(run=run)


def check_data(path: str, self_ok: bool) -> None:
    from lowbit.errors import LowbitError

    if self_ok and path == "self":
        return
    if not Path(path).is_file():
        raise LowbitError(f"--data {path}: no such file" + (" (or pass --data self)" if self_ok else ""))


def print_log(title: str, log, out) -> None:
    from rich.table import Table

    d = log.to_dict()
    t = Table(title=title)
    for c in ("steps", "tokens", "seconds", "loss (first 10%)", "loss (last 10%)"):
        t.add_column(c, justify="right")
    t.add_row(f"{d['steps']:,}", f"{d['tokens']:,}", f"{d['seconds']:.1f}", f"{d['loss_first']:.4f}",
              f"{d['loss_last']:.4f}")
    console().print(t)
    console().print(f"saved {out}")


def run(args) -> int:
    import torch

    from lowbit.errors import LowbitError
    from lowbit.formats import preflight
    from lowbit.models.loader import load
    from lowbit.quant.options import config_from_args
    from lowbit.train.qat import QATConfig, run_qat

    cfg = config_from_args(QATConfig, args, kv_cache=args.kv_cache or "none")
    if cfg.act_bits and args.format != "lowbit":
        raise LowbitError(f"--act-bits {cfg.act_bits}: the int8-activation layers are simulation layers no other "
                          f"format holds; use --format lowbit (or --act-bits 0)")
    check_out_free(args)
    check_data(args.data, self_ok=True)
    model, tok = load(args.model, dtype="fp32", device=args.device, strict=args.strict)
    preflight(args.format, cfg, {m.in_features for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)})
    log, data = run_qat(model, tok, cfg, args.data, device=args.device)
    method = {"method": "qat", **cfg.to_dict(), "training": log.to_dict()}
    out = model.save_pretrained(args.out, tok, method=method, calibration=data, overwrite=args.force,
                                kv_cache=args.kv_cache, save_dtype=args.save_dtype, format=args.format)
    print_log(f"QAT {cfg.spec.tag}" + (" + int8 activations" if cfg.act_bits else "") +
              f" on {data['source']}", log, out)
    return 0
