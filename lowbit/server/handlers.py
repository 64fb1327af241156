"""What the two generation endpoints do: validate a request against the model (`prepare_*` -> Job), then
either stream its outputs as server-sent events or collect them into one response.

A Job is one HTTP request: one engine request per prompt (the completions endpoint takes a list), each with
n completions; choice index = prompt index * n + completion index, as OpenAI numbers them.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from lowbit.config import SamplingParams
from lowbit.errors import LowbitError
from lowbit.generate import encode_chat
from lowbit.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    finish_reason,
    new_id,
    now,
    usage,
)


@dataclass
class Job:
    chat: bool
    requests: list[tuple[list[int], SamplingParams]]
    n: int
    model: str
    logprobs: bool
    token_ids: bool                  # return_token_ids
    include_usage: bool
    token_text: Any                  # token id -> its text (logprobs)
    id: str = ""
    created: int = field(default_factory=now)
    rids: list[int] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)    # engine request id -> prompt index

    def bind(self, rids: list[int]) -> None:
        self.rids, self.index = rids, {r: i for i, r in enumerate(rids)}


# ---------------------------------------------------------------------------------------------- validation
def _common(state, body) -> None:
    if body.model is not None and body.model != state.cfg.served_model_name:
        raise ApiError(404, f"the model '{body.model}' does not exist (this server has "
                            f"'{state.cfg.served_model_name}')", "model", "model_not_found")
    bad = body.unsupported()
    if bad:
        raise ApiError(400, f"{bad[0]}: not supported by this server", bad[0], "unsupported_parameter")


def _token_text(tok):
    if tok is None:
        return lambda t: f"token_id:{t}"
    return lambda t: tok.decode([t])


def _params(state, body, ids: list[int], max_tokens: int | None, logprobs: int | None, what: str
            ) -> SamplingParams:
    L = state.max_model_len
    if not ids:
        raise ApiError(400, f"{what}: the prompt has no tokens", what)
    if len(ids) >= L:
        raise ApiError(400, f"{what}: the prompt has {len(ids)} tokens; this model's maximum context length "
                            f"is {L} tokens", what, "context_length_exceeded")
    if any(not 0 <= t < state.vocab_size for t in ids):
        raise ApiError(400, f"{what}: token ids must be in [0, {state.vocab_size})", what)
    if max_tokens is None:
        max_tokens = L - len(ids)
    elif len(ids) + max_tokens > L:
        raise ApiError(400, f"max_tokens: {max_tokens} + the prompt's {len(ids)} tokens exceeds this model's "
                            f"maximum context length of {L} tokens", "max_tokens", "context_length_exceeded")
    stop = body.stop if body.stop is not None else []
    try:
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
                              max_tokens=max_tokens, stop=stop, seed=body.seed, ignore_eos=body.ignore_eos,
                              n=body.n, logprobs=logprobs)
    except LowbitError as e:
        field_name = str(e).split(":")[0]
        raise ApiError(400, str(e), field_name) from None


def _job(state, body, chat: bool, requests, logprobs: bool) -> Job:
    inc = bool(body.stream_options and body.stream_options.include_usage)
    return Job(chat, requests, body.n, state.cfg.served_model_name, logprobs, body.return_token_ids, inc,
               _token_text(state.tokenizer), new_id("chatcmpl" if chat else "cmpl"))


def prepare_completion(state, body: CompletionRequest) -> Job:
    _common(state, body)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    tok = state.tokenizer
    requests = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise ApiError(400, "prompt: this model has no tokenizer; send token ids", "prompt")
            ids = list(tok(p).input_ids)
        else:
            ids = list(p)
        requests.append((ids, _params(state, body, ids, body.max_tokens, body.logprobs, "prompt")))
    return _job(state, body, False, requests, body.logprobs is not None)


def prepare_chat(state, body: ChatCompletionRequest) -> Job:
    _common(state, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
    tok = state.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ApiError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    try:
        ids = encode_chat(tok, [{"role": m.role, "content": m.text()} for m in body.messages])
    except Exception as e:        # the template's own checks (e.g. roles must alternate) raise anything
        raise ApiError(400, f"messages: the chat template refused them ({type(e).__name__}: {e})",
                       "messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    lp = (body.top_logprobs or 0) if body.logprobs else None
    return _job(state, body, True, [(ids, _params(state, body, ids, max_tokens, lp, "messages"))], body.logprobs)


# ---------------------------------------------------------------------------------------------- responses
def _extras(job: Job, ids: list[int]) -> dict[str, Any]:
    return {"token_ids": ids} if job.token_ids else {}


def _logprobs(job: Job, entries, offset: int = 0):
    if not job.logprobs:
        return None
    return chat_logprobs(entries, job.token_text) if job.chat else completion_logprobs(entries, job.token_text,
                                                                                        offset)


def _response(job: Job, finals: dict[int, Any]) -> dict[str, Any]:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, rid in enumerate(job.rids):
        out = finals[rid]
        prompt_tokens += len(out.prompt_ids)
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            choice = {"index": p * job.n + c.index, "logprobs": _logprobs(job, c.logprobs or []),
                      "finish_reason": finish_reason(c.finish_reason), **_extras(job, c.token_ids)}
            if job.chat:
                choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
            else:
                choice["text"] = c.text
            choices.append(choice)
    choices.sort(key=lambda ch: ch["index"])
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def _wait_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(state, job: Job, queue: asyncio.Queue, request) -> dict[str, Any] | None:
    """Wait for every completion; None if the client disconnected first (its requests are aborted)."""
    finals: dict[int, Any] = {}
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while len(finals) < len(job.rids):
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return None
            out = get.result()
            if isinstance(out, Exception):
                raise ApiError(500, f"the engine failed ({type(out).__name__}); the server log has the details")
            if out.finished:
                finals[out.request_id] = out
    finally:
        gone.cancel()
        for rid in job.rids:
            if rid not in finals:
                state.aengine.abort(rid)
    return _response(job, finals)


@dataclass
class _Choice:
    sent: str = ""            # text already streamed
    tokens: int = 0           # tokens already streamed (logprobs, token ids)
    offset: int = 0           # text offset of the next token (completions logprobs)
    done: bool = False


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream(state, job: Job, queue: asyncio.Queue):
    """Server-sent events: one chunk per completion per step that produced text, a last chunk with its
    finish_reason, a usage chunk if asked, then `data: [DONE]`. Leaving early (the client disconnected)
    aborts the requests still running."""
    head = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": job.model}
    total = len(job.rids) * job.n
    choices = [_Choice() for _ in range(total)]
    hold = max((len(s) for _, sp in job.requests for s in sp.stop), default=1) - 1
    finals: dict[int, Any] = {}
    try:
        if job.chat:
            for i in range(total):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        while len(finals) < len(job.rids):
            outs = [await queue.get()]
            while not queue.empty():     # behind the engine: send what piled up in one write
                outs.append(queue.get_nowait())
            events = []
            for out in outs:
                if isinstance(out, Exception):
                    yield "".join(events) + _sse(error_body(500, f"the engine failed ({type(out).__name__})"))
                    return
                p = job.index[out.request_id]
                for c in out.outputs:
                    st = choices[p * job.n + c.index]
                    if st.done:
                        continue
                    chunk = _delta(job, st, c, hold)
                    if chunk is not None:
                        events.append(_sse({**head, "choices": [{"index": p * job.n + c.index, **chunk}]}))
                if out.finished:
                    finals[out.request_id] = out
            if events:
                yield "".join(events)
        if job.include_usage:
            pt = sum(len(o.prompt_ids) for o in finals.values())
            ct = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
            yield _sse({**head, "choices": [], "usage": usage(pt, ct)})
        yield "data: [DONE]\n\n"
    finally:
        for rid in job.rids:
            if rid not in finals:
                state.aengine.abort(rid)


def _delta(job: Job, st: _Choice, c, hold: int) -> dict[str, Any] | None:
    """This step's chunk of one completion, or None if there is nothing to send yet. Text that may still
    turn out to be the start of a stop string (the last len(longest stop) - 1 characters) or an incomplete
    UTF-8 character is held back until the next token decides it."""
    text = c.text
    if not c.finished:
        text = text.rstrip("\ufffd")
        if hold:
            text = text[:max(len(text) - hold, len(st.sent))]
    delta = text[len(st.sent):] if text.startswith(st.sent) else ""
    new_ids = c.token_ids[st.tokens:]
    if not delta and not new_ids and not c.finished:
        return None
    entries = (c.logprobs or [])[st.tokens:]
    lp = _logprobs(job, entries, st.offset)
    st.offset += sum(len(job.token_text(e.token_id)) for e in entries) if job.logprobs and not job.chat else 0
    st.sent += delta
    st.tokens = len(c.token_ids)
    st.done = c.finished
    chunk = {"logprobs": lp, "finish_reason": finish_reason(c.finish_reason) if c.finished else None,
             **_extras(job, new_ids)}
    if job.chat:
        chunk["delta"] = {"content": delta} if delta or not c.finished else {}
    else:
        chunk["text"] = delta
    return chunk
