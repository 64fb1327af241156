"""`lowbit export`: rewrite a quantized directory in another checkpoint format (no re-quantization), or write a
model as a file another runtime loads (--format gguf: llama.cpp)."""
from __future__ import annotations

from pathlib import Path

from lowbit.cli.common import add_format_arg, add_strict_arg, check_out_free, console

# Formats written from any model (a GGUF file, an HF directory, a quantized directory, or the default model),
# not only from a quantized directory: name -> words for --format's help.
RUNTIME_FORMATS = {"gguf": "llama.cpp's .gguf file, see --type",
                   "onnx": "an onnxruntime decoder with a KV cache, see --form"}

def add_parser(sub) -> None:
    p = sub.add_parser("export", help="rewrite a quantized directory as compressed-tensors, GPTQ, AWQ or lowbit; "
                                      "write a model as GGUF for llama.cpp",
                       description="Read a quantized directory (lowbit, compressed-tensors, GPTQ or AWQ) and write "
                                   "the same codes and scales in another format: compressed-tensors for vLLM, "
                                   "SGLang and transformers; gptq / awq for the hub's loaders. --format gguf "
                                   "writes any model (GGUF file, HF or quantized directory) as one GGUF file "
                                   "for llama.cpp, keeping lowbit's codes where its grid is the GGUF type. --format onnx "
                                   "writes any model as an ONNX decoder with a KV cache for onnxruntime (QDQ or "
                                   "QOperator), the quantized codes as they are.")
    p.add_argument("model", nargs="?", default=None,
                   help="quantized directory (lowbit quantize's output, or a hub checkpoint); for --format gguf also "
                        "a GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    add_format_arg(p, default=None, extra=RUNTIME_FORMATS)
    p.add_argument("-o", "--out", required=True, help="output directory (--format gguf: a FILE.gguf; --format onnx: a directory)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the unquantized tensors (embeddings, norms; default fp16)")
    p.add_argument("--type", default=None,
                   help="--format gguf: F32 | F16 | Q8_0 | Q4_0 | Q4_1 (default Q8_0); Q4_K and Q6_K are refused "
                        "(the gguf package cannot quantize them)")
    p.add_argument("--head-type", default=None,
                   help="--format gguf: type of a float output head (default Q8_0 with Q4_0 / Q4_1, else --type; "
                        "F32 keeps the head lowbit runs)")
    p.add_argument("--form", default=None, choices=["qdq", "qoperator"],
                   help="--format onnx: how quantized layers are written: qdq (DequantizeLinear on the codes; "
                        "default) or qoperator (onnxruntime's MatMulNBits / MatMulInteger)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16"],
                   help="--format onnx: activations and float weights (default fp32)")
    p.add_argument("--act-quant", default=None, choices=["per-token", "dynamic"],
                   help="--format onnx, W8A8 layers: per-token (int8 symmetric per row, lowbit's rounding; default) "
                        "or dynamic (DynamicQuantizeLinear: uint8 per tensor, onnxruntime's quantize_dynamic form)")
    add_strict_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from lowbit.errors import LowbitError

    for flag, v in (("--type", args.type), ("--head-type", args.head_type)):
        if v is not None and args.format != "gguf":
            raise LowbitError(f"{flag}: only --format gguf takes a type (got --format {args.format})")
    onnx_only = [f for f, v in (("--form", args.form), ("--dtype", args.dtype), ("--act-quant", args.act_quant))
                 if v is not None]
    if onnx_only and args.format != "onnx":
        raise LowbitError(f"{onnx_only[0]}: only --format onnx takes it (got --format {args.format})")
    if args.format == "gguf":
        return _run_gguf(args)
    elif args.format == "onnx":
        return _run_onnx(args)
    return _rewrite_checkpoint(args)


def _run_gguf(args) -> int:
    """Any model -> one GGUF file (lowbit.export.gguf_writer)."""
    from lowbit.errors import LowbitError
    from lowbit.export.gguf_writer import check_type, export_gguf
    from lowbit.models.loader import load

    qtype = args.type or "Q8_0"
    check_type(qtype)                   # refused before the model is loaded
    if args.head_type is not None:
        check_type(args.head_type, "--head-type")
    check_out_free(args)
    out = Path(args.out)
    if out.suffix != ".gguf" or out.is_dir():
        raise LowbitError(f"-o {out}: --format gguf writes one file; give a name ending in .gguf")
    model, tok = load(args.model, dtype="fp32", strict=args.strict)
    rep = export_gguf(model, tok, out, type=qtype, overwrite=args.force, head_type=args.head_type)
    console().print(f"exported {model.source} as GGUF {qtype}: {rep.summary()}")
    return 0


def _run_onnx(args) -> int:
    """Any model -> an ONNX decoder directory (lowbit.export.onnx_graph)."""
    import importlib.util

    from lowbit.errors import LowbitError
    from lowbit.export.onnx_graph import check_exportable, export_onnx
    from lowbit.models.loader import load

    check_out_free(args)
    out = Path(args.out)
    if out.suffix == ".onnx":
        raise LowbitError(f"-o {out}: --format onnx writes a directory (model.onnx, config.json, the tokenizer); "
                          f"give a directory name")
    form, dtype = args.form or "qdq", args.dtype or "fp32"
    if importlib.util.find_spec("onnx") is None:   # the optional extra: one line rather than a traceback
        raise LowbitError("--format onnx needs the onnx package: pip install 'lowbit[onnx]'")
    model, tok = load(args.model, dtype="fp32", strict=args.strict)
    check_exportable(model, form, dtype)          # one line naming the first layer that does not map
    rep = export_onnx(model, tok, out, form=form, dtype=dtype, overwrite=args.force,
                      act_quant=args.act_quant or "per-token")
    ops = ", ".join(f"{k} {v}" for k, v in sorted(rep["ops"].items(), key=lambda kv: -kv[1])[:6])
    console().print(f"exported {model.source} as ONNX {form} {dtype}: {rep['path']} ({rep['bytes'] / 1e6:.1f} MB, "
                    f"{rep['nodes']} nodes: {ops}, ...; onnx.checker passed) in {rep['seconds']:.1f} s")
    return 0


def _rewrite_checkpoint(args) -> int:
    """A quantized directory -> the same codes in another checkpoint format."""
    from lowbit.errors import LowbitError
    from lowbit.models.loader import load

    if args.model is None:
        raise LowbitError(f"MODEL: --format {args.format} rewrites a quantized directory; name one")
    check_out_free(args)
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
