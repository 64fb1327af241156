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
from lowbit.engine.sequence import SeqStatus, Sequence, TokenLogprob
from lowbit.errors import LowbitError
from lowbit.sampling import sample
from lowbit.stopping import append_token, eos_ids, final_text, text_decoder


@dataclass
class CompletionOutput:
    """One of a request's n completions (vLLM's name)."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None   # one per token_ids entry when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    """A request's state. `outputs` holds its n completions (SamplingParams.n); the top-level token_ids,
    new_token_ids, text and finish_reason mirror outputs[0]; `finished` is True once all n are done."""
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
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def total_time(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


def _auto_num_blocks(model, block_size: int, fraction: float, max_num_seqs: int, kv_quant,
                     max_model_len: int, kv_memory_bytes: int | None = None) -> int:
    """Blocks that fit in `kv_memory_bytes`, or else in `fraction` of the free device memory, capped at what
    max_num_seqs full-context (max_model_len) sequences could use."""
    cfg, dev = model.config, model.device
    if kv_memory_bytes is None:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
        else:
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                free = 2 ** 30
        kv_memory_bytes = int(free * fraction)
    n = num_blocks_for_memory(cfg, kv_memory_bytes, block_size, model.dtype, kv_quant)
    cap = max_num_seqs * -(-max_model_len // block_size)
    return min(n, cap)


class _LazyArgmax:
    """Greedy tokens of a whole batch from ONE argmax and one device->host copy, made on first use."""

    def __init__(self, logits):
        self.logits, self.ids = logits, None

    def __getitem__(self, i: int) -> int:
        if self.ids is None:
            self.ids = self.logits.argmax(-1).tolist()
        return self.ids[i]


def _token_logprobs(logits: torch.Tensor, sampled: list[tuple[Sequence, int, int]]) -> dict[int, TokenLogprob]:
    """{index into `sampled`: its token's TokenLogprob} for the sequences that asked for logprobs: one
    log-softmax and one top-k over just those rows, one device->host copy."""
    want = [j for j, (seq, _, _) in enumerate(sampled) if seq.params.logprobs is not None]
    if not want:
        return {}
    rows = torch.tensor([sampled[j][2] for j in want], device=logits.device)                 # [R]
    toks = torch.tensor([sampled[j][1] for j in want], device=logits.device)                 # [R]
    lp = logits.index_select(0, rows).float().log_softmax(-1)                                 # [R, V]
    k = max(sampled[j][0].params.logprobs for j in want)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())               # [R, k]
    chosen = lp.gather(1, toks[:, None])[:, 0].tolist()                                       # [R]
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out = {}
    for r, j in enumerate(want):
        n = sampled[j][0].params.logprobs
        out[j] = TokenLogprob(sampled[j][1], chosen[r], list(zip(top_i[r][:n], top_v[r][:n])))
    return out


class Engine:
    """The serving loop of one model: requests in (`add_request`), one scheduled batch per `step()` (chunked
    prefill and decode over a paged KV cache, continuous batching, preemption), finished outputs out;
    `abort` frees a request's blocks at once. `LLM` runs it to completion for a list of prompts."""

    def __init__(self, model, tokenizer=None, num_blocks: int | None = None, block_size: int = 16,
                 kv_memory_fraction: float = 0.5, max_num_seqs: int = 64, max_batched_tokens: int = 2048,
                 kv_quant=None, decode_path: bool | None = None, cuda_graphs: bool | None = None,
                 max_model_len: int | None = None, kv_memory_bytes: int | None = None):
        if not 0 < kv_memory_fraction <= 1:
            raise LowbitError(f"kv_memory_fraction: must be in (0, 1], got {kv_memory_fraction}")
        ctx = model.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= ctx:
            raise LowbitError(f"max_model_len: must be in [1, {ctx}] (the model's context), got {max_model_len}")
        self.max_model_len = ctx if max_model_len is None else max_model_len
        kv_quant = model.kv_quant if kv_quant is None else kv_quant
        if num_blocks is None:
            num_blocks = _auto_num_blocks(model, block_size, kv_memory_fraction, max_num_seqs, kv_quant,
                                          self.max_model_len, kv_memory_bytes)
        self.model, self.tokenizer = model, tokenizer
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, block_size, kv_quant, decode_path=decode_path,
                                  cuda_graphs=cuda_graphs, max_num_seqs=max_num_seqs)
        self._text = text_decoder(tokenizer)
        # the EOS set depends on the params only through ignore_eos: built once, not per sampled token
        self._eos = {ign: eos_ids(model.config, tokenizer, SamplingParams(ignore_eos=ign)) for ign in (False, True)}
        self._ids = itertools.count()
        self._groups: dict[int, list[Sequence]] = {}   # unfinished request id -> its n sequences
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
        if len(ids) + params.max_tokens > self.max_model_len:
            raise LowbitError(f"add_request: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                              f"exceeds the context of {self.max_model_len}")
        rid = next(self._ids)
        seq = Sequence(rid, ids, params, prompt=text)
        self.scheduler.add(seq)          # raises if the prompt alone needs more blocks than the pool
        # n > 1: the other completions are forked off `seq` (sharing its prompt's blocks) once prefilled.
        seq.children = [Sequence(rid, ids, params, prompt=text, index=i, arrival_time=seq.arrival_time)
                        for i in range(1, params.n)]
        self._groups[rid] = [seq, *seq.children]
        return rid

    def abort(self, request_id: int) -> bool:
        """Stop a request (all its completions) now and free its blocks; False if unknown or finished."""
        seqs = self.scheduler.abort(request_id)
        now = time.perf_counter()
        for seq in seqs:
            seq.finish_time = now
        self._groups.pop(request_id, None)
        return bool(seqs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ serving loop
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over the batch, sample, check stops. Returns one output per request
        that got a token or finished this step (with all its completions in `.outputs`)."""
        batch = self.scheduler.schedule()
        logits = self.runner.logits(batch) if batch.items else None
        self.scheduler.update(batch)
        self.num_steps += 1
        now = time.perf_counter()
        touched: dict[int, dict[int, list[int]]] = {}     # request id -> {completion index: new tokens}
        for seq in batch.finished:       # outgrew the whole KV pool
            seq.finish_time = now
            for c in seq.children:
                c.finish_time = now
            seq.children = []
            touched.setdefault(seq.request_id, {})[seq.index] = []
        sampled: list[tuple[Sequence, int, int]] = []    # (sequence, token, its logits row)
        greedy = _LazyArgmax(logits)
        for i, it in enumerate(batch.items):
            if not it.needs_sample:
                continue
            seq = it.seq
            sampled.append((seq, self._sample(logits, i, seq, greedy), i))
            if seq.children and not seq.output_ids:   # prompt prefilled: fork the other n - 1 completions
                for child in seq.children:
                    self.scheduler.fork(seq, child)
                    sampled.append((child, self._sample(logits, i, child, greedy), i))
                seq.children = []
        logprobs = _token_logprobs(logits, sampled)
        for j, (seq, tok, _) in enumerate(sampled):
            new = []
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = append_token(seq.output_ids, tok, seq.params, self._eos[seq.params.ignore_eos], self._text)
            if reason != "eos":
                new.append(tok)
                if j in logprobs:
                    seq.output_logprobs.append(logprobs[j])
            if reason is not None:
                self.scheduler.finish(seq, reason)
                seq.finish_time = now
            touched.setdefault(seq.request_id, {})[seq.index] = new
        outs = []
        for rid, news in touched.items():
            group = self._groups.get(rid)
            if group is None:
                continue
            out = self._output(group, news)
            if out.finished:
                del self._groups[rid]
            outs.append(out)
        return outs

    @staticmethod
    def _sample(logits: torch.Tensor, i: int, seq: Sequence, greedy: "_LazyArgmax") -> int:
        if seq.params.greedy:
            return greedy[i]
        return int(sample(logits[i:i + 1], seq.params, seq.get_generator(logits.device))[0])

    def _decode(self, seq: Sequence) -> str:
        return self._text(seq.output_ids) if self._text is not None else ""

    def _output(self, group: list[Sequence], news: dict[int, list[int]]) -> RequestOutput:
        comps = []
        for seq in group:
            text = final_text(self._decode(seq), seq.finish_reason, seq.params)
            comps.append(CompletionOutput(seq.index, list(seq.output_ids), list(news.get(seq.index, [])), text,
                                          seq.status is SeqStatus.FINISHED, seq.finish_reason,
                                          None if seq.params.logprobs is None else list(seq.output_logprobs)))
        first, c0 = group[0], comps[0]
        firsts = [s.first_token_time for s in group if s.first_token_time is not None]
        done = all(c.finished for c in comps)
        return RequestOutput(first.request_id, list(first.prompt_ids), c0.token_ids, c0.new_token_ids, c0.text,
                             done, c0.finish_reason, first.prompt, first.arrival_time,
                             min(firsts) if firsts else None,
                             max(s.finish_time or 0.0 for s in group) if done else None,
                             sum(s.num_preemptions for s in group), comps)


class LLM:
    """Offline batch generation through the engine: `LLM().generate(prompts, params)`.

    model_or_path: None (the default SmolLM2), a path for `lowbit.models.loader.load`, a model (pass
    tokenizer=...) or a (model, tokenizer) pair. Other keywords go to `Engine`. A request with
    SamplingParams(n=k) gives one RequestOutput whose `.outputs` holds its k completions.
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
        """Complete every prompt (text, or token ids; one or a list) with `params` (one for all, or one per
        prompt; default SamplingParams()) and return one RequestOutput per prompt, in prompt order."""
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
