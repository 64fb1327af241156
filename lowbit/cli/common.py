"""Arguments and helpers several subcommands share."""
from __future__ import annotations


def model_command(sub, name: str, help: str, description: str):
    """A subcommand's parser that takes a MODEL (and --dtype, --device, --kv-cache, --strict)."""
    p = sub.add_parser(name, help=help, description=description)
    add_model_arg(p)
    return p


def add_model_arg(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, GGUF file or quantized lowbit directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_kv_arg(p)
    add_strict_arg(p)


def add_strict_arg(p) -> None:
    p.add_argument("--strict", action="store_true",
                   help="refuse a model whose weights hold NaN or Inf (default: load it with a warning)")


def add_kv_arg(p) -> None:
    p.add_argument("--kv-cache", choices=["int8", "fp8"], default=None,
                   help="quantize the KV cache: int8 or fp8 (e4m3), a scale per token and head")


def console():
    import sys

    from rich.console import Console
    # Piped output would be cut to 80 columns; tables read better wider.
    return Console() if sys.stdout.isatty() else Console(width=120)


def add_format_arg(p, default: str | None = "lowbit", extra: dict[str, str] | None = None) -> None:
    """--format: the checkpoint formats, plus `extra` (name -> help words) a command writes besides them."""
    from lowbit.formats import FORMATS   # a table only: importing it loads no format module

    extra = extra or {}
    p.add_argument("--format", choices=["lowbit", *FORMATS, *extra], default=default, required=default is None,
                   help="checkpoint format: lowbit (every method), compressed-tensors (vLLM, SGLang, transformers, "
                        "llm-compressor), gptq or awq (the hub's layouts)"
                        + "".join(f", {k} ({v})" for k, v in extra.items())
                        + (f"; default {default}" if default else ""))


def check_out_free(args) -> None:
    """Refuse, before any work, an -o that exists unless --force was given (one line)."""
    from pathlib import Path

    from lowbit.errors import LowbitError

    if Path(args.out).exists() and not args.force:
        raise LowbitError(f"-o {args.out}: already exists (pass --force to replace it)")
