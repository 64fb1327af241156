"""The serving API: `Engine` (add_request / step / abort, continuous batching) and `LLM.generate`.

    engine = Engine(model, tok)
    engine.add_request("Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():
            ...
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.config import SamplingParams
from lowbit.engine.block_manager import BlockManager
from lowbit.engine.paged_cache import num_blocks_for_memory
from lowbit.engine.runner import ModelRunner
from lowbit.engine.scheduler import Scheduler
from lowbit.engine.sequence import SeqStatus, Sequence
from lowbit.errors import LowbitError
from lowbit.generate import _stop_at


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)        # all generated so far
    new_token_ids: list[int] = field(default_factory=list)    # generated in the step that returned this
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None                          # "eos" | "stop" | "length" | "abort"
    prompt: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


def _auto_num_blocks(model, block_size: int, fraction: float, max_num_seqs: int, kv_quant) -> int:
    """Blocks that fit in `fraction` of the free device memory, capped at what max_num_seqs full-context
    sequences could use."""
    cfg, dev = model.config, model.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 2 ** 30
    n = num_blocks_for_memory(cfg, int(free * fraction), block_size, model.dtype, kv_quant)
    cap = max_num_seqs * -(-cfg.max_position_embeddings // block_size)
    return min(n, cap)


class Engine:
    def __init__(self, model, tokenizer=None, num_blocks: int | None = None, block_size: int = 16,
                 kv_memory_fraction: float = 0.5, max_num_seqs: int = 64, max_batched_tokens: int = 2048,
                 kv_quant=None):
        if not 0 < kv_memory_fraction <= 1:
            raise LowbitError(f"kv_memory_fraction: must be in (0, 1], got {kv_memory_fraction}")
        kv_quant = model.kv_quant if kv_quant is None else kv_quant
        if num_blocks is None:
            num_blocks = _auto_num_blocks(model, block_size, kv_memory_fraction, max_num_seqs, kv_quant)
        self.model, self.tokenizer = model, tokenizer
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, kv_quant)
        eos = set(model.config.eos_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self._ids = itertools.count()
        self.num_steps = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a request (text or token ids); returns its id. Bad requests raise LowbitError and leave
        the engine as it was."""
        params = SamplingParams() if params is None else params
        if params.max_tokens <= 0:   # SamplingParams validates at construction; it may have been edited since
            raise LowbitError(f"max_tokens: must be > 0, got {params.max_tokens}")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LowbitError("add_request: a text prompt needs a tokenizer (or pass token ids)")
            text, ids = prompt, list(self.tokenizer(prompt).input_ids)
        else:
            ids = [int(t) for t in prompt]
        cfg = self.model.config
        if not ids:
            raise LowbitError("add_request: the prompt has no tokens")
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise LowbitError(f"add_request: token ids must be in [0, {cfg.vocab_size})")
        if len(ids) + params.max_tokens > cfg.max_position_embeddings:
            raise LowbitError(f"add_request: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                              f"exceeds the model's context of {cfg.max_position_embeddings}")
        seq = Sequence(next(self._ids), ids, params, prompt=text)
        self.scheduler.add(seq)          # raises if the prompt alone needs more blocks than the pool
        return seq.request_id

    def abort(self, request_id: int) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            seq.finish_time = time.perf_counter()
        return seq is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ serving loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over the batch, sample, check stops. Returns the requests that got a
        token or finished this step."""
        batch = self.scheduler.schedule()
        tokens = self.runner.run(batch)
        self.scheduler.update(batch)
        self.num_steps += 1
        now = time.perf_counter()
        outs = []
        for seq in batch.finished:       # outgrew the whole KV pool
            seq.finish_time = now
            outs.append(self._output(seq, []))
        for it, tok in zip(batch.items, tokens):
            if tok is None:
                continue
            seq, new = it.seq, []
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = None
            if tok in self.eos_ids and not seq.params.ignore_eos:
                reason = "eos"
            else:
                seq.output_ids.append(tok)
                new.append(tok)
                if (seq.params.stop and self.tokenizer is not None
                        and _stop_at(self._decode(seq), seq.params.stop) >= 0):
                    reason = "stop"
                if reason is None and len(seq.output_ids) >= seq.params.max_tokens:
                    reason = "length"
            if reason is not None:
                self.scheduler.finish(seq, reason)
                seq.finish_time = now
            outs.append(self._output(seq, new))
        return outs

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else ""

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        text = self._decode(seq)
        if seq.finish_reason == "stop":
            text = text[:_stop_at(text, seq.params.stop)]
        return RequestOutput(seq.request_id, list(seq.prompt_ids), list(seq.output_ids), new, text,
                             seq.status is SeqStatus.FINISHED, seq.finish_reason, seq.prompt,
                             seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_preemptions)


class LLM:
    """Offline batch generation through the engine: `LLM().generate(prompts, params)`.

    model_or_path: None (the default SmolLM2), a path for `lowbit.models.loader.load`, a model (pass
    tokenizer=...) or a (model, tokenizer) pair. Other keywords go to `Engine`. n > 1 is not supported.
    """

    def __init__(self, model_or_path=None, tokenizer=None, dtype: str = "fp32", device: str = "cpu",
                 **engine_kw):
        if model_or_path is None or isinstance(model_or_path, (str, Path)):
            from lowbit.models.loader import load
            model, tokenizer = load(model_or_path, dtype=dtype, device=device)
        elif isinstance(model_or_path, tuple):
            model, tokenizer = model_or_path
        else:
            model = model_or_path
        self.engine = Engine(model, tokenizer, **engine_kw)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                              and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = SamplingParams() if params is None else params
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LowbitError(f"generate: {len(prompts)} prompts but {len(plist)} sampling params")
        engine = self.engine
        ids = []
        try:
            for p, sp in zip(prompts, plist):   # validate all before serving any
                ids.append(engine.add_request(p, sp))
        except LowbitError:
            for rid in ids:
                engine.abort(rid)
            raise
        final: dict[int, RequestOutput] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in ids]
