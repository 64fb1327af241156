"""`lowbit export`: rewrite a quantized directory in another checkpoint format (no re-quantization)."""
from __future__ import annotations

from pathlib import Path

from lowbit.cli.common import add_format_arg, add_strict_arg, console


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="rewrite a quantized directory as compressed-tensors, GPTQ, AWQ or lowbit",
                       description="Read a quantized directory (lowbit, compressed-tensors, GPTQ or AWQ) and write "
                                   "the same codes and scales in another format: compressed-tensors for vLLM, "
                                   "SGLang and transformers; gptq / awq for the hub's loaders.")
    p.add_argument("model", help="quantized directory (lowbit quantize's output, or a hub checkpoint)")
    add_format_arg(p, default=None)
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the unquantized tensors (embeddings, norms; default fp16)")
    add_strict_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from lowbit.errors import LowbitError
    from lowbit.models.loader import load

    if Path(args.out).exists() and not args.force:
        raise LowbitError(f"-o {args.out}: already exists (pass --force to replace it)")
    if not Path(args.model).is_dir():
        raise LowbitError(f"{args.model}: not a directory (export reads a quantized checkpoint directory)")
    model, tok = load(args.model, dtype="fp32", strict=args.strict)
    qcfg = getattr(model, "quantization_config", None)
    if qcfg is None:
        raise LowbitError(f"{args.model}: not a quantized checkpoint (no quantization config); "
                          f"quantize it first: lowbit quantize {args.model} --format {args.format} -o OUT")
    method = qcfg.get("method") or {}
    out = model.save_pretrained(args.out, tok, method=method, overwrite=args.force, save_dtype=args.save_dtype,
                                format=args.format, kv_cache=qcfg.get("kv_cache"))
    n = len(qcfg.get("modules", {}))
    console().print(f"exported {n} quantized layers of {args.model} ({qcfg.get('format', 'lowbit')}) "
                    f"as {args.format}: {out}")
    return 0
