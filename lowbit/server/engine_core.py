"""The engine in its own process: it loads the model, then steps the engine as fast as it can, taking
requests and aborts from a pipe and sending each step's outputs back.

Why a process and not a thread: the engine's Python work (scheduling, building the step's inputs, sampling)
and the HTTP server's (JSON, server-sent events for every request at every step) both need the interpreter
lock; in one process the step rate of a busy GPU server halves (benchmarks/serve_load.py measured 0.50 of
the offline engine on the H200 that way). vLLM splits the same way.

Messages are JSON (no pickle) over a multiprocessing Connection:
  in:  {"op": "add", "id", "ids", "params"} | {"op": "abort", "id"} | {"op": "stop"}
  out: {"op": "ready", "info"} | {"op": "accepted", "id", "stats"} | {"op": "refused", "id", "error"}
       | {"op": "step", "outs", "stats"} | {"op": "stats", "stats"} | {"op": "failed", "ids", "error"}
A step's outs: [id, finished, [[index, new_ids, text_delta, text_reset, finished, reason, logprobs]]].
"""
from __future__ import annotations

import gc
import json
import logging
import signal
from dataclasses import asdict, dataclass

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError, first_line

log = logging.getLogger("lowbit.server")

_PARAM_FIELDS = ("temperature", "top_k", "top_p", "max_tokens", "stop", "seed", "ignore_eos", "n", "logprobs")


@dataclass
class EngineSpec:
    """Everything the engine process needs to build its model and engine: plain values only."""
    model: str | None = None           # path for lowbit.models.loader.load (None: the default model)
    shape: str | None = None           # or a random-initialised shape (benchmarks)
    dtype: str = "fp32"
    device: str = "cpu"
    kv_cache: str | None = None
    strict: bool = False
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    kv_memory_fraction: float = 0.5
    kv_cache_memory_gb: float | None = None   # a fixed KV-cache size instead of the fraction (the CPU default)
    max_model_len: int | None = None
    num_blocks: int | None = None
    check_invariants: bool = False     # check the block manager each time the engine goes idle

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def params_to_json(p) -> dict:
    return {f: getattr(p, f) for f in _PARAM_FIELDS}


def _build(spec: EngineSpec):
    import torch

    from lowbit.engine.llm import Engine
    torch.set_grad_enabled(False)
    if spec.shape is not None:
        from lowbit.models.loader import resolve_dtype
        from lowbit.models.shapes import random_llama
        model, tok = random_llama(spec.shape, resolve_dtype(spec.dtype), spec.device), None
        model.source = f"random {spec.shape}"
    else:
        from lowbit.models.loader import load
        model, tok = load(spec.model, dtype=spec.dtype, device=spec.device, kv_cache=spec.kv_cache,
                          strict=spec.strict)
    kv_bytes = None if spec.kv_cache_memory_gb is None else int(spec.kv_cache_memory_gb * 2**30)
    engine = Engine(model, tok, num_blocks=spec.num_blocks, kv_memory_bytes=kv_bytes,
                    kv_memory_fraction=spec.kv_memory_fraction, max_num_seqs=spec.max_num_seqs,
                    max_batched_tokens=spec.max_batched_tokens, max_model_len=spec.max_model_len)
    bm = engine.block_manager
    info = {"name": model.config.name, "source": getattr(model, "source", ""), "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""), "max_model_len": engine.max_model_len,
            "vocab_size": model.config.vocab_size, "num_blocks": bm.num_blocks, "block_size": bm.block_size}
    return engine, info


class _Core:
    def __init__(self, engine, conn, check_invariants: bool):
        self.engine, self.conn, self.check = engine, conn, check_invariants
        self.cid: dict[int, int] = {}            # engine request id -> client id
        self.rid: dict[int, int] = {}            # client id -> engine request id
        # what each completion has sent so far: rid -> {index: (tokens, text, logprobs)}
        self.sent: dict[int, dict[int, tuple[int, str, int]]] = {}
        self.checks = self.failures = 0

    def send(self, obj) -> None:
        self.conn.send_bytes(json.dumps(obj, separators=(",", ":")).encode())

    def stats(self) -> list:
        e, bm = self.engine, self.engine.block_manager
        return [len(e.scheduler.running), len(e.scheduler.waiting), bm.num_free_blocks, bm.num_blocks,
                self.checks, self.failures]

    def handle(self, msg: dict) -> bool:
        """Apply one message; False on stop."""
        op = msg["op"]
        if op == "stop":
            return False
        if op == "abort":
            rid = self.rid.pop(msg["id"], None)
            if rid is not None:
                self.engine.abort(rid)
                self._forget(rid)
        elif op == "add":
            try:
                rid = self.engine.add_request(msg["ids"], SamplingParams(**msg["params"]))
            except LowbitError as e:
                self.send({"op": "refused", "id": msg["id"], "error": str(e)})
                return True
            self.cid[rid], self.rid[msg["id"]] = msg["id"], rid
            self.send({"op": "accepted", "id": msg["id"], "stats": self.stats()})   # the queue grew: say so now
        return True

    def _forget(self, rid: int) -> None:
        self.rid.pop(self.cid.pop(rid, None), None)
        self.sent.pop(rid, None)

    def outputs(self, outs) -> list:
        res = []
        for out in outs:
            cid = self.cid.get(out.request_id)
            if cid is None:
                continue
            comps, sent = [], self.sent.setdefault(out.request_id, {})
            for c in out.outputs:
                n_tok, text, n_lp = sent.get(c.index, (0, "", 0))
                reset = not c.text.startswith(text)
                delta = c.text if reset else c.text[len(text):]
                lps = [[e.token_id, e.logprob, e.top] for e in (c.logprobs or [])[n_lp:]]
                comps.append([c.index, c.token_ids[n_tok:], delta, reset, c.finished, c.finish_reason, lps])
                sent[c.index] = (len(c.token_ids), c.text, n_lp + len(lps))
            res.append([cid, out.finished, comps])
            if out.finished:
                self._forget(out.request_id)
        return res

    def idle(self) -> None:
        if not self.check:
            return
        bm = self.engine.block_manager
        self.checks += 1
        try:
            bm.check_invariants()
            if bm.num_free_blocks != bm.num_blocks:
                raise AssertionError(f"{bm.num_blocks - bm.num_free_blocks} KV blocks still held while idle")
        except AssertionError as e:
            self.failures += 1
            log.error("KV block invariant violated: %s", e)

    def run(self) -> None:
        conn, engine = self.conn, self.engine
        while True:
            busy = engine.has_unfinished()
            if not busy and not conn.poll(None):      # idle: block until a message comes
                continue
            while conn.poll(0):
                if not self.handle(json.loads(conn.recv_bytes())):
                    return
            if not engine.has_unfinished():
                if busy or self.check:
                    self.idle()
                self.send({"op": "stats", "stats": self.stats()})
                continue
            try:
                outs = engine.step()
            except Exception as e:      # a bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                ids = list(self.rid)
                for rid in list(self.cid):
                    engine.abort(rid)
                    self._forget(rid)
                self.send({"op": "failed", "ids": ids, "error": f"{type(e).__name__}: {e}"})
                continue
            res = self.outputs(outs)
            if not engine.has_unfinished():
                self.idle()
            self.send({"op": "step", "outs": res, "stats": self.stats()})


def engine_main(spec_json: str, conn) -> None:
    """Entry point of the engine process."""
    # The server process owns the lifetime: Ctrl-C in a terminal reaches the whole process group, but the
    # engine must keep stepping while the server drains; it exits when told, or when the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="engine: %(levelname)s %(message)s")
    spec = EngineSpec(**json.loads(spec_json))
    try:
        engine, info = _build(spec)
    except Exception as e:
        msg = str(e) if isinstance(e, LowbitError) else f"{type(e).__name__}: {first_line(e)}"
        conn.send_bytes(json.dumps({"op": "error", "error": msg}).encode())
        return
    # the model and engine live until exit: keep them out of the cyclic collector's passes, which otherwise
    # walk them every few steps as each step allocates its outputs
    gc.collect()
    gc.freeze()
    core = _Core(engine, conn, spec.check_invariants)
    core.send({"op": "ready", "info": info})
    try:
        core.run()
    except (EOFError, BrokenPipeError, OSError):
        pass                             # the server went away
