"""`lowbit inspect`: parameters, memory, FLOPs, arithmetic intensity and roofline bounds of a model."""
from __future__ import annotations

from lowbit.atomic import write_json_atomic
from lowbit.cli.common import console


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="memory / FLOPs / roofline analysis of a model or a bare config",
                       description="Analyse a model's architecture without running it: parameters by "
                                   "component, weight and KV-cache memory, activations, FLOPs with and "
                                   "without KV cache, per-op arithmetic intensity and roofline bounds.")
    p.add_argument("model", nargs="?", default=None, help="HF dir or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--config", help="a config.json instead of a model (no weights needed)")
    p.add_argument("--batch", type=int, default=1, help="batch size b (default 1)")
    p.add_argument("--seqlen", type=int, default=2048, help="sequence length s (default 2048)")
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100 | l4 | cpu (default h100)")
    p.add_argument("--bits", type=int, default=16, help="weight bits for the roofline: 32, 16 or 2..8")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (default 128)")
    p.add_argument("--kv-bytes", type=float, default=2, help="bytes per KV element (2 fp16, 1 int8/fp8)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from lowbit.analysis import analyse, render
    from lowbit.models.loader import load_config

    cfg = load_config(args.config or args.model)
    report = analyse(cfg, batch=args.batch, seqlen=args.seqlen, gpu=args.gpu, weight_bits=args.bits,
                     group_size=args.group_size, kv_bytes=args.kv_bytes)
    render(report, console())
    if args.json:
        write_json_atomic(args.json, report)
    return 0
