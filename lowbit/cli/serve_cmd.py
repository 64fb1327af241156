"""`lowbit serve`: an OpenAI-compatible HTTP server on the engine."""
from __future__ import annotations

from lowbit.cli.common import add_model_arg


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL (HF directory, GGUF file or quantized directory) on "
                                   "/v1/completions, /v1/chat/completions and /v1/models, with /health and "
                                   "/metrics (Prometheus). SIGTERM or Ctrl-C drains: running requests finish, "
                                   "new ones get 503.")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                      "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model's file name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most (default 64)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per request, prompt + output (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests beyond this are refused with 429 (default 256)")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens per engine step (default 2048)")
    p.add_argument("--kv-memory-fraction", type=float, default=0.5,
                   help="on a GPU: fraction of free memory for the KV cache (default 0.5)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV-cache size in GiB instead of the fraction (default on the CPU: 2)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="request bodies larger than this get 413 (default 4 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish (default 30)")
    p.add_argument("--check-invariants", action="store_true",
                   help="check the KV block manager each time the engine goes idle (metrics count the checks)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=run)


def _check(args) -> None:
    from pathlib import Path

    from lowbit.errors import LowbitError
    if not 0 <= args.port <= 65535:
        raise LowbitError(f"--port: must be in [0, 65535], got {args.port}")
    for name in ("max_num_seqs", "max_waiting", "max_batched_tokens", "max_request_bytes"):
        if getattr(args, name) <= 0:
            raise LowbitError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
        raise LowbitError(f"--kv-cache-memory: must be > 0 GiB, got {args.kv_cache_memory}")
    if args.drain_timeout < 0:
        raise LowbitError(f"--drain-timeout: must be >= 0, got {args.drain_timeout}")
    if args.model is not None and not Path(args.model).exists():     # before an engine process is spawned
        raise LowbitError(f"{args.model}: no such file or directory")


def run(args) -> int:
    import sys

    from lowbit.server import EngineSpec, ServerConfig

    _check(args)
    spec = EngineSpec(model=args.model, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache,
                      strict=args.strict, max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                      kv_memory_fraction=args.kv_memory_fraction, max_model_len=args.max_model_len,
                      kv_cache_memory_gb=args.kv_cache_memory if args.kv_cache_memory is not None
                      else (2.0 if args.device == "cpu" else None),
                      check_invariants=args.check_invariants)
    serve(spec, ServerConfig(served_model_name=args.served_model_name, api_key=args.api_key,
                             max_request_bytes=args.max_request_bytes),
          args.max_waiting, args.host, args.port, args.drain_timeout, args.log_level, file=sys.stderr)
    return 0


def serve(spec, cfg, max_waiting, host, port, drain_timeout, log_level, file=None) -> None:
    """Start the engine process (it loads the model), then serve until a signal drains the server."""
    from lowbit.models.loader import load_tokenizer
    from lowbit.server import AsyncEngine, create_app, run_server

    aengine = AsyncEngine(spec, max_waiting)
    info = aengine.start()
    try:
        tok = None if spec.shape else load_tokenizer(spec.model)
        app = create_app(aengine, tok, cfg)
        print(f"lowbit serve: '{cfg.served_model_name}' on http://{host}:{port}/v1 ({info['device']}, "
              f"{info['dtype']}, context {info['max_model_len']}, {info['num_blocks']} KV blocks of "
              f"{info['block_size']} tokens, max {spec.max_num_seqs} sequences"
              f"{', API key required' if cfg.api_key else ''})", file=file, flush=True)
        run_server(app, host, port, drain_timeout, log_level)
    finally:
        aengine.shutdown()
