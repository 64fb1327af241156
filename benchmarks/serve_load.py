"""Load test of `lowbit serve` through real HTTP: N requests at a fixed concurrency, a share of them cancelled
mid-stream and a share malformed, against the offline engine (`LLM.generate`) on the same prompts in the
same run.

    python benchmarks/serve_load.py                                     # CPU, default model (short outputs)
    python benchmarks/serve_load.py --shape llama-1b --device cuda --concurrency 256 --max-tokens 100-300

It reports: every valid request completed; each completed output identical (token ids) to the same
prompt's greedy output generated alone (every prompt on the CPU; on the GPU a sample, the rest against the
offline batch); each cancelled stream a prefix of it; 0 KV blocks leaked at the end (free == total, the
block manager's invariant checker after every idle); /health answered throughout; client-side p50 / p99
time to first token and inter-token latency; output tokens/s of the server against the offline engine.

The server is a subprocess: `lowbit serve` on the default model, or (--shape) this script's `--serve` mode,
which serves a random-initialised model of that shape (no tokenizer: prompts and outputs are token ids).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ceilings import machine, write_results  # noqa: E402
from live_server import Server, httpx  # noqa: E402

from lowbit.config import SamplingParams  # noqa: E402
from lowbit.engine import LLM  # noqa: E402

MALFORMED = [
    ('{"prompt": [1, 2, 3], "max_tokens": ', "malformed JSON"),
    ('{"prompt": [1, 2, 3], "max_tokens": "ten"}', "wrong type"),
    ('{"prompt": [1, 2, 3], "n": 0}', "n out of range"),
    ('{"prompt": [1, 2, 3], "model": "nope"}', "unknown model"),
    ('{"prompt": [1, 2, 3], "max_tokens": 100000000}', "max_tokens past the context"),
]


def lengths(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


# ---------------------------------------------------------------------------------------------- workload
def make_workload(args, vocab: int, tok) -> list[dict]:
    rng = random.Random(args.seed)
    omin, omax = lengths(args.max_tokens)
    if tok is not None and not Path(args.text).exists():
        print(f"{args.text} is not here: random-token prompts", flush=True)
        tok = None
    if tok is not None:       # real text: WikiText-2 test lines, cut to the prompt length range
        from lowbit.text import read_text
        lines = [ln.strip() for ln in read_text(args.text).splitlines() if len(ln.strip()) > 40
                 and not ln.strip().startswith("=")]
        rng.shuffle(lines)
    pmin, pmax = lengths(args.prompt_len)
    reqs, bad = [], 0
    for i in range(args.requests):
        n = rng.randint(pmin, pmax)
        ids = (tok(lines[i % len(lines)]).input_ids[:n] if tok is not None
               else [rng.randrange(100, vocab) for _ in range(n)])
        r = {"i": i, "prompt": ids, "max_tokens": rng.randint(omin, omax), "kind": "valid"}
        u = rng.random()
        if u < args.malformed:
            r["kind"], (r["payload"], r["what"]) = "malformed", MALFORMED[bad % len(MALFORMED)]
            bad += 1
        elif u < args.malformed + args.cancel:
            r["kind"], r["cancel_after"] = "cancel", rng.randint(1, max(1, r["max_tokens"] // 2))
        reqs.append(r)
    return reqs


def params(r: dict, ignore_eos: bool) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=ignore_eos)


# ---------------------------------------------------------------------------------------------- the client
async def one(client, r: dict, ignore_eos: bool) -> dict:
    if r["kind"] == "malformed":
        resp = await client.post("/v1/completions", content=r["payload"], headers={"Content-Type": "application/json"})
        body = resp.json()
        return {"status": resp.status_code, "error_body": set(body.get("error", {})) == {"message", "type", "param",
                                                                                           "code"}}
    body = {"prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0, "stream": True,
            "return_token_ids": True, "ignore_eos": ignore_eos}
    t0 = time.perf_counter()
    ids, times, finish, done = [], [], None, False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "error": (await resp.aread()).decode()[:200]}
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            c = json.loads(line[6:])["choices"][0]
            if c.get("token_ids"):
                times.append((time.perf_counter(), len(c["token_ids"])))
            ids += c.get("token_ids") or []
            finish = c["finish_reason"] or finish
            if r["kind"] == "cancel" and len(ids) >= r["cancel_after"]:
                break                    # leaving the block closes the connection mid-stream
    # TTFT: request sent -> first token; ITL: gaps between chunks that brought tokens (several tokens come in
    # one chunk when the reader is behind the engine); TPOT: (last - first token time) / (tokens - 1)
    n = sum(k for _, k in times)
    return {"status": 200, "ids": ids, "finish": finish, "done": done,
            "ttft": times[0][0] - t0 if times else None, "itl": [b[0] - a[0] for a, b in zip(times, times[1:])],
            "tpot": (times[-1][0] - times[0][0]) / (n - 1) if n > 1 else None,
            "tokens_per_chunk": n / len(times) if times else None}


async def drive(url: str, reqs: list[dict], concurrency: int, ignore_eos: bool, probe: bool = True
                ) -> tuple[dict[int, dict], dict, float, float]:
    """Send `reqs` with `concurrency` workers; (results by request index, /health record, start, end)."""
    results: dict[int, dict] = {}
    health = {"polls": 0, "failures": 0, "max_latency_s": 0.0}
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while not queue.empty():
                r = queue.get_nowait()
                try:
                    results[r["i"]] = await one(client, r, ignore_eos)
                except Exception as e:        # a transport failure is a result to report, not a crash
                    results[r["i"]] = {"status": None, "error": f"{type(e).__name__}: {e}"}

        async def prober():
            async with httpx.AsyncClient(base_url=url, timeout=10) as probe:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        ok = (await probe.get("/health")).status_code == 200
                    except httpx.TransportError:
                        ok = False
                    health["polls"] += 1
                    health["failures"] += not ok
                    health["max_latency_s"] = max(health["max_latency_s"], time.perf_counter() - t)
                    await asyncio.sleep(0.25)
        probe_task = asyncio.create_task(prober()) if probe else None
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1 = time.monotonic()
        stop.set()
        if probe_task is not None:
            await probe_task
    return results, health, t0, t1


def _drive_share(url, reqs, concurrency, ignore_eos, probe):
    return asyncio.run(drive(url, reqs, concurrency, ignore_eos, probe))


def drive_procs(url: str, reqs: list[dict], concurrency: int, ignore_eos: bool, procs: int):
    """The load from `procs` client processes (one Python process parsing every stream of a fast GPU server
    falls behind it, and then measures itself): (results in request order, /health record, wall seconds)."""
    if procs <= 1:
        res, health, t0, t1 = asyncio.run(drive(url, reqs, concurrency, ignore_eos))
    else:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(procs) as pool:
            futs = [pool.submit(_drive_share, url, reqs[k::procs], concurrency // procs, ignore_eos, k == 0)
                    for k in range(procs)]
            parts = [f.result() for f in futs]
        res = {i: x for p in parts for i, x in p[0].items()}
        health, t0, t1 = parts[0][1], min(p[2] for p in parts), max(p[3] for p in parts)
    return [res.get(r["i"]) for r in reqs], health, t1 - t0


# ---------------------------------------------------------------------------------------------- server mode
def serve_random(args) -> None:
    """--serve: a random-initialised model of --shape behind the real server (what `lowbit serve` runs)."""
    from lowbit.cli.serve_cmd import serve
    from lowbit.server import EngineSpec, ServerConfig
    spec = EngineSpec(shape=args.shape, dtype="bf16" if args.device == "cuda" else "fp32", device=args.device,
                      num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                      check_invariants=True)
    serve(spec, ServerConfig(served_model_name="smollm2"), 10 * args.requests, "127.0.0.1", args.port, 30.0,
          "warning")


def load_model(args):
    if args.shape:
        from lowbit.models.shapes import random_llama
        return random_llama(args.shape, torch.bfloat16 if args.device == "cuda" else torch.float32,
                            args.device), None
    from lowbit.models.loader import load
    return load(None, dtype="fp32", device=args.device)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="random-initialised shape (e.g. llama-1b); default: the real "
                                                  "default model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--max-tokens", default="16", help="output length, N or MIN-MAX")
    ap.add_argument("--prompt-len", default="8-64", help="prompt length in tokens, N or MIN-MAX")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--cancel", type=float, default=0.10)
    ap.add_argument("--malformed", type=float, default=0.05)
    ap.add_argument("--alone", type=int, default=None, help="prompts generated alone as the reference "
                                                            "(default: all valid ones)")
    ap.add_argument("--client-procs", type=int, default=None,
                    help="client processes sharing the concurrency (default: one per 64 streams)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"
                                          / "wiki.test.raw"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-blocks", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.max_num_seqs = args.max_num_seqs or args.concurrency
    args.client_procs = args.client_procs or max(1, args.concurrency // 64)
    omin, omax = lengths(args.max_tokens)
    pmin, pmax = lengths(args.prompt_len)
    args.max_model_len = args.max_model_len or 16 * -(-(pmax + omax) // 16)
    args.num_blocks = args.num_blocks or args.max_num_seqs * (args.max_model_len // 16)
    if args.serve:
        return serve_random(args)
    torch.set_grad_enabled(False)
    ignore_eos = args.shape is not None            # a random model's EOS is noise: run every request to length
    model, tok = load_model(args)
    reqs = make_workload(args, model.config.vocab_size, tok)
    args.prompts = "WikiText-2 test lines" if tok is not None and Path(args.text).exists() else "random tokens"
    valid = [r for r in reqs if r["kind"] != "malformed"]
    llm = LLM((model, tok), num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len)

    # 1. each prompt alone (the reference), then 2. the offline engine on all valid prompts at once (timed)
    alone_set = valid if args.alone is None else random.Random(1).sample(valid, min(args.alone, len(valid)))
    t0 = time.perf_counter()
    alone = {}
    for k, r in enumerate(alone_set):
        alone[r["i"]] = llm.generate(r["prompt"], params(r, ignore_eos))[0].token_ids
        if k % 100 == 0:
            print(f"alone {k}/{len(alone_set)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # warm-up on other prompts (the same lengths; other tokens, so nothing of the timed run is prefix-cached)
    warm = [r for r in make_workload(argparse.Namespace(**{**vars(args), "seed": args.seed + 1}),
                                     model.config.vocab_size, tok) if r["kind"] != "malformed"][:2 * args.concurrency]
    llm.generate([r["prompt"] for r in warm], [params(r, ignore_eos) for r in warm])
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    offline = llm.generate([r["prompt"] for r in valid], [params(r, ignore_eos) for r in valid])
    if args.device == "cuda":
        torch.cuda.synchronize()
    off_wall = time.perf_counter() - t0
    off_tokens = sum(len(o.token_ids) for o in offline)
    print(f"offline: {off_tokens} tokens in {off_wall:.1f} s = {off_tokens / off_wall:.0f} tok/s", flush=True)
    batch_ref = {r["i"]: o.token_ids for r, o in zip(valid, offline)}
    print(f"offline: {off_tokens} tokens in {off_wall:.1f} s = {off_tokens / off_wall:.0f} tok/s", flush=True)
    del llm, model
    if args.device == "cuda":
        torch.cuda.empty_cache()

    # 3. the server, through HTTP
    common = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    if args.shape:
        srv = Server(ready_timeout=600, argv=[sys.executable, __file__, "--serve", "--shape", args.shape,
                                              "--device", args.device, "--requests", str(args.requests),
                                              "--num-blocks", str(args.num_blocks), *common])
    else:
        srv = Server("--device", args.device, "--max-waiting", str(10 * args.requests), "--check-invariants",
                     *common)
    try:
        drive_procs(srv.url, warm, args.concurrency, ignore_eos, args.client_procs)         # the same warm-up
        results, health, wall = drive_procs(srv.url, reqs, args.concurrency, ignore_eos, args.client_procs)
        m = srv.wait_idle()
    finally:
        srv.stop()
    report(args, reqs, results, health, wall, m, alone, batch_ref, off_tokens, off_wall)


def report(args, reqs, results, health, wall, m, alone, batch_ref, off_tokens, off_wall):
    count = {"valid": 0, "cancel": 0, "malformed": 0}
    for r in reqs:
        count[r["kind"]] += 1
    completed = [(r, x) for r, x in zip(reqs, results) if r["kind"] == "valid" and x.get("done")]
    cancelled = [(r, x) for r, x in zip(reqs, results) if r["kind"] == "cancel" and x.get("status") == 200]
    malformed = [(r, x) for r, x in zip(reqs, results) if r["kind"] == "malformed"]
    same_alone = [x["ids"] == alone[r["i"]] for r, x in completed if r["i"] in alone]
    same_batch = [x["ids"] == batch_ref[r["i"]] for r, x in completed]
    prefix_ok = [x["ids"] == (alone.get(r["i"]) or batch_ref[r["i"]])[:len(x["ids"])] for r, x in cancelled]
    tokens = sum(len(x.get("ids", [])) for x in results if x)
    ttft = [x["ttft"] for _, x in completed + cancelled if x.get("ttft") is not None]
    itl = [g for _, x in completed + cancelled for g in x["itl"]]
    tpot = [x["tpot"] for _, x in completed if x.get("tpot") is not None]
    per_chunk = [x["tokens_per_chunk"] for _, x in completed if x.get("tokens_per_chunk")]
    fails = [x for r, x in zip(reqs, results) if r["kind"] != "malformed" and x.get("status") != 200]
    out = {
        **machine(), "shape": args.shape or "SmolLM2-135M-Instruct (fp32)", "device": args.device,
        "requests": args.requests, "concurrency": args.concurrency, "client_procs": args.client_procs,
        "max_num_seqs": args.max_num_seqs,
        "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "prompts": args.prompts,
        "max_model_len": args.max_model_len,
        "kinds": count, "valid_completed": len(completed), "valid_failed": len(fails),
        "failures": [f.get("error") for f in fails][:5],
        "identical_to_alone": f"{sum(same_alone)}/{len(same_alone)}",
        "identical_to_offline_batch": f"{sum(same_batch)}/{len(same_batch)}",
        "cancelled_prefix_of_reference": f"{sum(prefix_ok)}/{len(prefix_ok)}",
        "malformed_answered_4xx_with_error_body": f"{sum(400 <= x['status'] < 500 and x['error_body'] for _, x in malformed)}"
                                                  f"/{len(malformed)}",
        "malformed_statuses": sorted({x["status"] for _, x in malformed}),
        "kv_blocks_free_at_end": m["lowbit_kv_blocks_free"], "kv_blocks_total": m["lowbit_kv_blocks_total"],
        "kv_invariant_checks": m["lowbit_kv_invariant_checks"],
        "kv_invariant_failures": m["lowbit_kv_invariant_failures"],
        "health": health, "server_wall_s": wall, "server_output_tokens": tokens,
        "server_tokens_per_s": tokens / wall, "offline_output_tokens": off_tokens, "offline_wall_s": off_wall,
        "offline_tokens_per_s": off_tokens / off_wall, "server_vs_offline": (tokens / wall) / (off_tokens / off_wall),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99), "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99),
        "tokens_per_chunk_mean": statistics.fmean(per_chunk) if per_chunk else None,
    }
    dev = "h200" if "H200" in (out["gpu"] or "") else args.device
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"serve_load_{dev}"
    ms = lambda s: "-" if s is None else f"{1e3 * s:.1f} ms"  # noqa: E731
    md = [f"# `lowbit serve` under load ({out['gpu'] or 'CPU'}, {out['date']})", "", f"`{out['command']}`", "",
          f"{args.requests} requests through HTTP at concurrency {args.concurrency} on {out['shape']}: "
          f"{count['valid']} valid, {count['cancel']} cancelled mid-stream, {count['malformed']} malformed. "
          f"Prompts {args.prompt_len} tokens ({args.prompts}), outputs {args.max_tokens} tokens, greedy"
          f"{', EOS ignored' if args.shape else ''}. Offline = `LLM.generate` of the same valid prompts in the "
          "same run, same engine settings; both first run the same warm-up on other prompts. The load comes from "
          f"{args.client_procs} client process(es).", "",
          "| check | result |", "|---|---|",
          f"| valid requests completed | {len(completed)}/{count['valid']} ({len(fails)} failed) |",
          f"| outputs identical to the prompt generated alone | {out['identical_to_alone']} |",
          f"| outputs identical to the offline batch | {out['identical_to_offline_batch']} |",
          f"| cancelled streams a prefix of the reference | {out['cancelled_prefix_of_reference']} |",
          f"| malformed answered 4xx + OpenAI error body | {out['malformed_answered_4xx_with_error_body']} "
          f"(statuses {out['malformed_statuses']}) |",
          f"| KV blocks free at the end | {out['kv_blocks_free_at_end']:.0f} / {out['kv_blocks_total']:.0f} "
          f"({out['kv_invariant_checks']:.0f} invariant checks, {out['kv_invariant_failures']:.0f} failed) |",
          f"| /health during the run | {health['polls'] - health['failures']}/{health['polls']} answered, "
          f"slowest {ms(health['max_latency_s'])} |",
          f"| TTFT p50 / p99 (client) | {ms(out['ttft_p50_s'])} / {ms(out['ttft_p99_s'])} |",
          f"| time per output token (TPOT) p50 / p99 (client, per request) | {ms(out['tpot_p50_s'])} / "
          f"{ms(out['tpot_p99_s'])} |",
          f"| inter-token latency p50 / p99 (client, gaps between chunks) | {ms(out['itl_p50_s'])} / "
          f"{ms(out['itl_p99_s'])} ({out['tokens_per_chunk_mean']:.2f} tokens per chunk) |",
          f"| output tokens/s: server | {out['server_tokens_per_s']:.0f} ({tokens} tokens in {wall:.1f} s) |",
          f"| output tokens/s: offline engine | {out['offline_tokens_per_s']:.0f} ({off_tokens} tokens in "
          f"{off_wall:.1f} s) |",
          f"| server / offline | {out['server_vs_offline']:.2f} |"]
    write_results(path, out, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
