"""`lowbit generate`: stream a completion, then a one-line timing summary."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the KV cache, streaming tokens",
                       description="Prefill the prompt once, then decode token by token with the KV cache. "
                                   "Instruct models get their chat template unless --raw.")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT",
                   help="an optional model path followed by the prompt")
    add_model_arg_options(p)
    p.set_defaults(run=run)


def add_model_arg_options(p) -> None:
    from lowbit.cli.common import add_kv_arg
    add_kv_arg(p)
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
    import torch

    from lowbit.config import SamplingParams
    from lowbit.errors import LowbitError
    from lowbit.generate import encode_prompt, generate
    from lowbit.models.loader import load

    if len(args.args) > 2:
        raise LowbitError("generate takes [MODEL] PROMPT: quote the prompt")
    model_path, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    params = SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                            top_p=args.top_p, max_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    model, tok = load(model_path, dtype=args.dtype, device=args.device, kv_cache=args.kv_cache)
    chat = not args.raw and bool(getattr(tok, "chat_template", None))
    ids = encode_prompt(tok, prompt, chat=chat)

    shown: list[int] = []
    printed = ""

    def stream(_row: int, token: int) -> None:
        nonlocal printed
        shown.append(token)
        text = tok.decode(shown, skip_special_tokens=True)
        # Print only whole characters: a partial UTF-8 sequence decodes to U+FFFD until completed.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    model(torch.tensor([ids[:1]], device=model.device))  # warm-up: first-call setup is not prefill time
    outs, stats = generate(model, tok, [ids], params, on_token=stream)
    final = outs[0].text
    if final.startswith(printed) and len(final) > len(printed):
        sys.stdout.write(final[len(printed):])
    print(flush=True)
    print(f"[{stats.summary()} | finish: {outs[0].finish_reason} | load {model.load_seconds:.1f} s]",
          file=sys.stderr)
    return 0
