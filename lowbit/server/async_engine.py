"""The server's side of the engine process (engine_core.py): requests go out through a pipe, each step's
outputs come back on a reader thread and are handed to the event loop, which puts them on the requests'
asyncio queues. Nothing here blocks the event loop.

The queues carry `Output`s: per request, its completions' accumulated token ids, text and logprobs (the
same fields the handlers read from the engine's RequestOutput), updated in place step by step.
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field

from lowbit.config import SamplingParams
from lowbit.engine.sequence import TokenLogprob
from lowbit.errors import LowbitError
from lowbit.server.engine_core import EngineSpec, engine_main, params_to_json

log = logging.getLogger("lowbit.server")


class QueueFull(Exception):
    """More requests are waiting than --max-waiting allows."""


@dataclass
class Completion:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    last_token: float = 0.0          # when its last token arrived (0: none yet)
    counted: bool = False            # its finish is in the metrics


@dataclass
class Output:
    request_id: int
    prompt_ids: list[int]
    outputs: list[Completion]
    arrival: float
    queue: asyncio.Queue
    finished: bool = False


class AsyncEngine:
    """`start()` spawns the engine process and waits until its model is loaded; `submit(ids, params, queue)`
    -> request id once the engine accepted it (its Outputs then arrive on `queue`; an Exception item if the
    engine failed); `abort(id)`; `stop()`. `metrics` (optional) is told about tokens and latencies."""

    def __init__(self, spec: EngineSpec, max_waiting: int | None = None, metrics=None):
        self.spec, self.max_waiting, self.metrics = spec, max_waiting, metrics
        self.info: dict = {}
        self.stats = [0, 0, 0, 0, 0, 0]     # running, waiting, free blocks, total blocks, checks, failures
        self.dead: str | None = None         # why the engine process is gone
        self._ids = iter(range(1 << 62))
        self._pending: dict[int, tuple[asyncio.Future, Output]] = {}
        self._active: dict[int, Output] = {}
        self._proc = self._conn = self._loop = None
        self._send_lock = threading.Lock()
        self._stopping = False

    # ------------------------------------------------------------------ state (read from handlers)
    @property
    def num_waiting(self) -> int:
        return len(self._pending) + self.stats[1]

    @property
    def num_running(self) -> int:
        return self.stats[0]

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._pending) + len(self._active)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 900.0) -> dict:
        """Spawn the engine process and wait for its model (blocking: call before serving). Returns the
        engine's info (name, device, context, KV blocks); raises LowbitError if it could not load."""
        ctx = multiprocessing.get_context("spawn")    # fork would copy the server's threads and CUDA state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_main, args=(self.spec.to_json(), child), name="lowbit-engine",
                                 daemon=True)
        self._proc.start()
        child.close()
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                raise LowbitError(f"the engine process exited with {self._proc.exitcode} while loading the model")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise LowbitError(f"the engine process did not load the model in {timeout:.0f} s")
        msg = json.loads(self._conn.recv_bytes())
        if msg["op"] == "error":
            self._proc.join(10)
            raise LowbitError(msg["error"])
        self.info = msg["info"]
        self.stats[2] = self.stats[3] = self.info["num_blocks"]
        return self.info

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering outputs to `loop` (the server's event loop)."""
        self._loop = loop
        threading.Thread(target=self._reader, name="lowbit-engine-reader", daemon=True).start()

    def shutdown(self) -> None:
        if self._proc is None:
            return
        self._stopping = True
        try:
            self._send({"op": "stop"})
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    # ------------------------------------------------------------------ handler side
    def _send(self, obj) -> None:
        with self._send_lock:
            self._conn.send_bytes(json.dumps(obj, separators=(",", ":")).encode())

    async def submit(self, ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> int:
        """Queue a request; returns its id once the engine accepted it. Raises QueueFull, or LowbitError if the
        engine refused it (e.g. its prompt needs more KV blocks than the whole pool) or is gone."""
        if self.dead:
            raise LowbitError(f"the engine is not running: {self.dead}")
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are already waiting (--max-waiting {self.max_waiting})")
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = (fut, Output(cid, list(ids), [Completion(i) for i in range(params.n)],
                                          time.perf_counter(), queue))
        self._send({"op": "add", "id": cid, "ids": list(ids), "params": params_to_json(params)})
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:         # the client left while queued: abort once accepted
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or self.abort(cid))
            raise
        return cid

    def abort(self, cid: int) -> None:
        """Stop a request; the engine frees its blocks before its next step. Unknown or finished ids are ignored."""
        if self._active.pop(cid, None) is not None and not self.dead:
            try:
                self._send({"op": "abort", "id": cid})
            except OSError:
                pass

    # ------------------------------------------------------------------ engine side (event loop)
    def _reader(self) -> None:
        try:
            while True:
                msg = json.loads(self._conn.recv_bytes())
                self._loop.call_soon_threadsafe(self._dispatch, msg)
        except (EOFError, OSError):
            if self._stopping:                 # we told it to stop
                return
            self._proc.join(1)
            try:
                self._loop.call_soon_threadsafe(self._died, f"the engine process exited (code {self._proc.exitcode})")
            except RuntimeError:               # the event loop is closed: the server is gone too
                pass

    def _dispatch(self, msg: dict) -> None:
        op = msg["op"]
        if "stats" in msg:
            self.stats = msg["stats"]
        if op == "accepted":
            fut, out = self._pending.pop(msg["id"])
            self._active[msg["id"]] = out
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(out.prompt_ids))
            if not fut.done():
                fut.set_result(msg["id"])
        elif op == "refused":
            fut, _ = self._pending.pop(msg["id"])
            if not fut.done():
                fut.set_exception(LowbitError(msg["error"]))
        elif op == "step":
            self._deliver(msg["outs"])
        elif op == "failed":
            err = RuntimeError(msg["error"])
            for cid in msg["ids"]:
                out = self._active.pop(cid, None)
                if out is not None:
                    out.queue.put_nowait(err)

    def _deliver(self, outs: list) -> None:
        now, m = time.perf_counter(), self.metrics
        for cid, finished, comps in outs:
            out = self._active.get(cid)
            if out is None:                 # aborted while its step ran
                continue
            for index, new_ids, delta, reset, done, reason, lps in comps:
                c = out.outputs[index]
                c.token_ids += new_ids
                c.text = delta if reset else c.text + delta
                c.finished, c.finish_reason = done, reason
                if lps or c.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + [TokenLogprob(t, lp, [tuple(x) for x in top])
                                                       for t, lp, top in lps]
                if new_ids and m is not None:
                    m.generation_tokens.inc(len(new_ids))
                    (m.itl if c.last_token else m.ttft).observe(now - (c.last_token or out.arrival))
                if new_ids:
                    c.last_token = now
                if done and m is not None and not c.counted:
                    m.finished.labels(reason or "abort").inc()
                    c.counted = True
            out.finished = finished
            out.queue.put_nowait(out)
            if finished:
                del self._active[cid]

    def _died(self, why: str) -> None:
        if self.dead:
            return
        self.dead = why
        log.error("%s; failing %d request(s)", why, self.num_in_flight)
        err = RuntimeError(why)
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(LowbitError(why))
        for out in self._active.values():
            out.queue.put_nowait(err)
        self._pending.clear()
        self._active.clear()
