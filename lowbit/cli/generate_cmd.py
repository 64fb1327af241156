"""`lowbit generate`: stream a completion, then a one-line timing summary."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the serving engine (paged KV cache), streaming tokens",
                       description="Prefill the prompt once, then decode token by token with the KV cache. "
                                   "Instruct models get their chat template unless --raw.")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT",
                   help="an optional model path followed by the prompt")
    add_model_arg_options(p)
    p.set_defaults(run=run)


def add_model_arg_options(p) -> None:
    from lowbit.cli.common import add_kv_arg, add_strict_arg
    add_kv_arg(p)
    add_strict_arg(p)
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def run(args) -> int:
    import time

    import torch

    from lowbit.config import SamplingParams
    from lowbit.engine import Engine
    from lowbit.errors import LowbitError
    from lowbit.generate import GenerationStats, encode_prompt
    from lowbit.models.loader import load

    if len(args.args) > 2:
        raise LowbitError("generate takes [MODEL] PROMPT: quote the prompt")
    model_path, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    params = SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                            top_p=args.top_p, max_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    model, tok = load(model_path, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache,
                      strict=args.strict)
    chat = not args.raw and bool(getattr(tok, "chat_template", None))
    ids = encode_prompt(tok, prompt, chat=chat)

    # One request through the serving engine; its paged KV cache takes kv_quant (--kv-cache) from the model.
    block_size = 16
    num_blocks = -(-(len(ids) + params.max_tokens) // block_size) + 1
    engine = Engine(model, tok, num_blocks=num_blocks, block_size=block_size,
                    max_batched_tokens=max(2048, len(ids)))
    model(torch.tensor([ids[:1]], device=model.device))  # warm-up: first-call setup is not prefill time

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    shown: list[int] = []
    printed, final = "", None
    stats = GenerationStats(prompt_tokens=len(ids))
    engine.add_request(ids, params)
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished():
        for out in engine.step():
            shown.extend(out.new_token_ids)
            text = tok.decode(shown, skip_special_tokens=True)
            # Print only whole characters: a partial UTF-8 sequence decodes to U+FFFD until completed.
            if not text.endswith("\ufffd") and out.finish_reason != "stop":
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
            if out.finished:
                final = out
        if t_first is None:
            sync()
            t_first = time.perf_counter()
        else:
            stats.decode_steps += 1
    sync()
    stats.prefill_seconds = t_first - t0
    stats.decode_seconds = time.perf_counter() - t_first
    text = final.text
    if text.startswith(printed) and len(text) > len(printed):
        sys.stdout.write(text[len(printed):])
    print(flush=True)
    print(f"[{stats.summary()} | finish: {final.finish_reason} | load {model.load_seconds:.1f} s]",
          file=sys.stderr)
    return 0
