"""`lowbit quantize`: run a registered method over the model block by block and save the result."""
from __future__ import annotations

import argparse

from lowbit.cli.common import add_format_arg, add_model_arg, check_out_free, console


class _QuantizeParser(argparse.ArgumentParser):
    """The quantize parser, which adds one flag per method config field (lowbit.quant.options) the first
    time it parses or prints its help: the fields live in the method modules, which import torch, and the
    other subcommands (and `lowbit --help`) should not pay for that."""

    def _add_method_flags(self) -> None:
        if getattr(self, "_method_flags", None) is not None:
            return
        from lowbit.quant.options import method_flags
        from lowbit.quant.registry import registered_methods

        self._method_flags = method_flags()
        names = ", ".join(sorted(registered_methods()))
        group = self.add_argument_group(
            "method options", f"--method is one of {names}. Each option below applies to the methods in "
                              "brackets (with their defaults); giving it to another is an error.")
        for f in self._method_flags.values():
            group.add_argument(f.flag, dest=f.name, default=None, help=f.help, **f.kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._add_method_flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_method_flags()
        return super().format_help()


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with a registered method and save it",
                       description="Quantize the decoder blocks' Linears one block at a time and write a "
                                   "directory (safetensors + versioned quantization config + tokenizer).")
    p.__class__ = _QuantizeParser   # argparse makes subparsers of the main parser's class; only this one is lazy
    add_model_arg(p)
    p.add_argument("--method", default="rtn", help="registered method, see method options (default rtn)")
    p.add_argument("--calib", help="calibration text file (e.g. ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_format_arg(p)
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the tensors no method quantizes (embeddings, norms, an untied head; default fp16)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from lowbit.errors import LowbitError
    from lowbit.formats import check_method, preflight
    from lowbit.models.loader import load
    from lowbit.quant.api import calibration_windows, quantize
    from lowbit.quant.options import method_flags
    from lowbit.quant.registry import get_method

    method_name = args.method
    # the flags given; one that is not a field of this method's config is get_method's one-line error
    opts = {k: getattr(args, k) for k in method_flags() if getattr(args, k, None) is not None}
    method = get_method(method_name, **opts)
    check_method(args.format, method_name)
    if getattr(method.cfg, "bits_budget", 0) and args.format != "lowbit":
        raise LowbitError(f"--bits-budget: --format {args.format} holds one bit width for every layer; use --format lowbit")
    check_out_free(args)
    model, tok = load(args.model, dtype=args.dtype, device=args.device, strict=args.strict)
    preflight(args.format, method.cfg, {m.in_features for m in model.model.layers.modules()
                                        if isinstance(m, torch.nn.Linear)})
    calib = None
    if args.calib:
        calib = calibration_windows(tok, args.calib, args.nsamples, args.calib_seqlen, args.seed)
    elif method.needs_calibration:
        raise LowbitError(f"--method {method_name} needs calibration data: pass --calib FILE")
    result = quantize(model, method, calib, device=args.device)
    out = result.save(model, tok, args.out, overwrite=args.force, kv_cache=args.kv_cache,
                      save_dtype=args.save_dtype, format=args.format)
    result.print(console())
    console().print(f"saved {out}")
    return 0
