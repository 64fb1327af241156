"""`lowbit` console command: one subcommand module per job, registered in COMMANDS."""
from __future__ import annotations

import argparse
import sys

from lowbit.errors import LowbitError

# name -> module path; each module has `add_parser(subparsers)` (which sets `func`) and a `run(args)`.
COMMANDS = {
    "inspect": "lowbit.cli.inspect_cmd",
    "eval": "lowbit.cli.eval_cmd",
    "generate": "lowbit.cli.generate_cmd",
    "quantize": "lowbit.cli.quantize_cmd",
    "compare": "lowbit.cli.compare_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Make LLM inference cheaper and show why. MODEL is a Hugging Face directory or a "
                    "GGUF file; without it the default SmolLM2-135M-Instruct is used.")
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    from lowbit import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
