"""The OpenAI wire format: request models (validated by pydantic, field names as the `openai` package's
types spell them), the error body, and the response / stream-chunk builders.

Requests are strict (`"5"` is not an integer) and ignore fields they do not know, as vLLM does, so a newer
client's extra field is not an error; fields lowbit knows but cannot honour (penalties, logit_bias, tools,
echo, suffix) are refused with a 400 naming them rather than silently dropped.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lowbit.config import MAX_LOGPROBS

MAX_N = 16              # completions per request
MAX_STOP = 16           # stop strings per request


class ApiError(Exception):
    """An error the server answers with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- requests
class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)              # vLLM's extension; -1 or 0: off
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False                            # vLLM's extension
    return_token_ids: bool = False                      # vLLM's extension: token ids in every choice
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> list[str]:
        """Fields set to something lowbit does not implement."""
        bad = [f for f in ("presence_penalty", "frequency_penalty") if getattr(self, f)]
        return bad + (["logit_bias"] if self.logit_bias else [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions."""
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], Annotated[list[int], Field(min_length=1)],
                  Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]]
    max_tokens: int | None = Field(16, ge=1)            # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported() + (["echo"] if self.echo else []) + (["suffix"] if self.suffix else [])
        return bad + (["best_of"] if self.best_of not in (None, self.n) else [])


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported() + (["tools"] if self.tools else [])
        fmt = (self.response_format or {}).get("type", "text")
        return bad + (["response_format"] if fmt != "text" else [])


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


# ---------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(engine_reason: str | None) -> str | None:
    """The engine's eos / stop / length -> OpenAI's stop / length (None while running)."""
    return None if engine_reason is None else ("length" if engine_reason == "length" else "stop")


def completion_logprobs(entries, token_text, offset: int) -> dict[str, Any]:
    """The completions endpoint's logprobs object for TokenLogprobs `entries`, text offsets from `offset`."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(e.token_id))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def chat_logprobs(entries, token_text) -> dict[str, Any]:
    """The chat endpoint's logprobs object ({"content": [...]}) for TokenLogprobs `entries`."""
    def one(t: int, lp: float) -> dict[str, Any]:
        s = token_text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}
