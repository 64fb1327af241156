"""`lowbit` console command: one subcommand module per job, registered in COMMANDS."""
from __future__ import annotations

import argparse
import sys
import warnings

from lowbit.errors import LowbitError, LowbitWarning, first_line

DEBUG_HELP = "on an error, print the full traceback (otherwise one line)"

# name -> module path; each module has `add_parser(subparsers)` (which sets `func`) and a `run(args)`.
COMMANDS = {
    "inspect": "lowbit.cli.inspect_cmd",
    "eval": "lowbit.cli.eval_cmd",
    "generate": "lowbit.cli.generate_cmd",
    "quantize": "lowbit.cli.quantize_cmd",
    "compare": "lowbit.cli.compare_cmd",
    "export": "lowbit.cli.export_cmd",
    "qat": "lowbit.cli.qat_cmd",
    "distill": "lowbit.cli.distill_cmd",
    "serve": "lowbit.cli.serve_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Make LLM inference cheaper and show why. MODEL is a Hugging Face directory or a "
                    "GGUF file; without it the default SmolLM2-135M-Instruct is used.")
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    for p in sub.choices.values():  # `lowbit eval --debug ...` works too; SUPPRESS keeps a top-level --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _version() -> str:
    from lowbit import __version__
    return __version__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """lowbit's own warnings as one line, `warning: ...`; others as Python prints them."""
    if issubclass(category, LowbitWarning):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors print one line on stderr (the traceback too with --debug): exit status 2 for
    a LowbitError (bad input or arguments), 1 for anything else (a bug in lowbit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            import traceback
            traceback.print_exc()
        if isinstance(e, LowbitError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__}: {first_line(e)} (a bug in lowbit; "
              f"{'the traceback is above' if debug else 'rerun with --debug for the traceback'})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
