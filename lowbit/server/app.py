"""The HTTP application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as
server-sent events or not), /health and /metrics, on FastAPI.

Every failure is answered with OpenAI's error body and the right status, never a traceback: malformed JSON
400, a wrong type or out-of-range field 422, an unknown model 404, a prompt or max_tokens past the context
400, a missing or wrong API key 401, a body over the limit 413, a full queue 429, draining 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.server import handlers
from lowbit.errors import LowbitError
from lowbit.server.async_engine import AsyncEngine, QueueFull
from lowbit.server.metrics import Metrics
from lowbit.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body, now

log = logging.getLogger("lowbit.server")


@dataclass
class ServerConfig:
    """What `lowbit serve` exposes beyond the engine's own settings."""
    served_model_name: str | None = None    # default: the model's name
    api_key: str | None = None
    max_request_bytes: int = 4 << 20        # a bigger body gets 413


class ServerState:
    """What the handlers share: the engine client, metrics, tokenizer, limits, and whether we are draining."""

    def __init__(self, aengine: AsyncEngine, tokenizer, cfg: ServerConfig):
        info = aengine.info
        cfg.served_model_name = cfg.served_model_name or info["name"] or "default"
        self.cfg, self.tokenizer, self.aengine = cfg, tokenizer, aengine
        self.metrics = aengine.metrics = Metrics(aengine, cfg.served_model_name)
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.created = now()
        self.draining = False


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           state: ServerState | None = None, headers: dict | None = None) -> JSONResponse:
    if state is not None:
        state.metrics.rejected.labels(str(status)).inc()
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class _Guard:
    """ASGI middleware in front of every route: 503 while draining, 401 without the API key, 413 for a body
    over the limit (counted as it arrives, so a chunked upload without Content-Length is caught too)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path = self.state, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/"):
            if st.draining:
                return await _error(503, "the server is shutting down", code="server_draining",
                                    state=st)(scope, receive, send)
            key = st.cfg.api_key
            if key is not None and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                           f"Bearer {key}".encode()):   # constant time
                return await _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                    code="invalid_api_key", state=st)(scope, receive, send)
        limit = st.cfg.max_request_bytes
        too_big = _error(413, f"request body is larger than {limit} bytes", code="request_too_large", state=st)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:               # read the body here, up to the limit, then replay it to the route
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_big(scope, receive, send)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()           # then: the client's disconnect, when it comes
        return await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param) of pydantic's errors: 400 for a body that is not JSON, else 422 naming the
    first bad field (a union field, e.g. prompt, fails once per accepted form: reported once)."""
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return 400, "malformed JSON body: it does not parse", None
    e = errs[0] if errs else {}
    # the field path only: drop "body" and the names pydantic gives a union's branches (str, list[int], ...)
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_branch(p)]
    param = ".".join(loc) or None
    if e.get("type") == "missing":
        return 422, f"{param}: field required", param
    if len(errs) > 1 and all(_field(x) == _field(e) for x in errs):
        return 422, f"{param}: matches none of the accepted types", param
    return 422, f"{param or 'body'}: {e.get('msg', 'invalid value')}", param


def _is_branch(p) -> bool:
    return isinstance(p, str) and (p in ("str", "int", "float", "bool", "list", "dict") or "[" in p)


def _field(e) -> tuple:
    return tuple(p for p in e.get("loc", ()) if p != "body" and not _is_branch(p))[:1]


def create_app(aengine: AsyncEngine, tokenizer=None, cfg: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving a started AsyncEngine (its engine process has loaded the model). Outputs flow to
    the app's event loop from startup; the engine process is stopped at shutdown."""
    state = ServerState(aengine, tokenizer, cfg or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        aengine.attach(asyncio.get_running_loop())
        yield
        aengine.shutdown()

    app = FastAPI(title="lowbit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lowbit = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        status, msg, param = _validation_message(exc)
        return _error(status, msg, param, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return _error(exc.status, exc.message, exc.param, exc.code, state=state, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, msg, state=state)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details",
                      state=state)

    @app.get("/health")
    async def health():
        if aengine.dead:
            return JSONResponse({"status": "engine stopped", "reason": aengine.dead}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.cfg.served_model_name, "object": "model",
                                            "created": state.created, "owned_by": "lowbit",
                                            "max_model_len": state.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(handlers.prepare_completion(state, body), body.stream, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _serve(handlers.prepare_chat(state, body), body.stream, request)

    async def _serve(job: handlers.Job, stream: bool, request: Request):
        if aengine.dead:
            raise ApiError(503, f"the engine is not running: {aengine.dead}", code="engine_dead")
        queue = asyncio.Queue()
        rids = []
        try:
            for ids, params in job.requests:
                rids.append(await state.aengine.submit(ids, params, queue))
        except BaseException as e:
            for rid in rids:
                state.aengine.abort(rid)
            if isinstance(e, QueueFull):
                raise ApiError(429, f"too many requests waiting: {e}", code="queue_full") from None
            if isinstance(e, LowbitError):
                raise ApiError(400, str(e), "prompt") from None
            raise
        job.bind(rids)
        if stream:
            return StreamingResponse(handlers.stream(state, job, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        body = await handlers.collect(state, job, queue, request)
        if body is None:                   # the client is gone; nobody reads this (nginx's "client closed")
            state.metrics.rejected.labels("499").inc()
            return Response(status_code=499)
        return JSONResponse(body)

    return app
