"""The HTTP side of `g3n serve` (Starlette): OpenAI's chat-completions and models routes, a health
route, and the chat page at /. Generation happens on the scheduler's thread; handlers only parse,
queue and relay events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from g3n.errors import G3nError
from g3n.inference.backends import check_modalities
from g3n.serve.errors import APIError, bad
from g3n.serve.scheduler import Job, QueueFull, Scheduler
from g3n.serve.schema import ChatRequest, parse_body, parse_chat_request


@dataclass
class Limits:
    max_queue: int = 32  # requests waiting beyond the running batch; more get 429
    max_batch: int = 8  # requests generated together (g3n's engine; GGUF: 1)
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_tokens: int = 1024  # a request's max_tokens when it gives none
    max_body_bytes: int = 20 * 2**20  # request bodies (base64 images and audio count here)


def _error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class APIKey:
    """ASGI middleware: every route but /health needs the key, as `Authorization: Bearer KEY`, or as
    HTTP Basic auth's password (any user name), which is how a browser opening the chat page
    sends it: the 401 asks the browser for it, and it then sends it with the page's requests."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = auth.partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given).decode().partition(":")[2]
            except ValueError:
                given = ""
        if scheme.lower() in ("bearer", "basic") and hmac.compare_digest(given.encode(), self.key.encode()):
            return await self.app(scope, receive, send)
        e = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' (the --api-key given "
                     "to g3n serve)", type="invalid_request_error", code="invalid_api_key")  # fmt: skip
        await _error(e, {"WWW-Authenticate": 'Basic realm="g3n", charset="UTF-8"'})(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-body-mb)",
                       code="request_too_large")  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine, limits: Limits | None = None, api_key: str | None = None) -> Starlette:
    """The ASGI app for one loaded engine; its scheduler thread starts and stops with the app."""
    limits = limits or Limits()
    scheduler = Scheduler(engine, limits.max_queue, limits.max_batch)
    max_prompt = min(limits.max_prompt_tokens or engine.context_length - 1, engine.context_length - 1)
    created = int(time.time())
    page = resources.files("g3n.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "g3n",
                "modalities": sorted(engine.modalities), "context_length": engine.context_length}  # fmt: skip

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.name, **scheduler.stats()})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request):
        if request.path_params["model"] != engine.name:
            raise APIError(404, f"The model '{request.path_params['model']}' does not exist; this server runs "
                           f"'{engine.name}'", param="model", code="model_not_found")  # fmt: skip
        return JSONResponse(model_card())

    def prepare(body: dict) -> tuple[ChatRequest, list[int], dict | None]:
        """Parse, decode media, tokenize and run the media processor (in a worker thread: images
        can take a while)."""
        req = parse_chat_request(body, engine.name, limits.max_tokens)
        try:
            check_modalities(engine, req.modalities)
        except G3nError as e:
            raise bad(str(e), "messages", "unsupported_modality") from None
        try:
            ids, media = engine.prepare(req.messages)
        except G3nError as e:
            raise bad(str(e), "messages") from None
        if len(ids) > max_prompt:
            raise bad(f"the prompt is {len(ids)} tokens; this server takes at most {max_prompt} "
                      f"(model context {engine.context_length}, --max-prompt-tokens)", "messages",
                      "context_length_exceeded")  # fmt: skip
        return req, ids, media

    async def chat_completions(request: Request):
        body = parse_body(await _read_body(request, limits.max_body_bytes))
        req, ids, media = await run_in_threadpool(prepare, body)
        job = Job(ids, req.params, req.stop, asyncio.get_running_loop(), media, req.logit_bias, req.logprobs)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full") from None  # fmt: skip
        reply = _Reply(engine.name, len(ids))
        if req.stream:
            return StreamingResponse(_sse(job, reply, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return JSONResponse(await _collect(job, reply, request))

    async def on_api_error(request: Request, e: APIError):
        return _error(e)

    async def on_http_error(request: Request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind))

    async def on_crash(request: Request, e: Exception):
        return _error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    return APIKey(app, api_key) if api_key else app


class _Reply:
    """OpenAI's response shapes for one request."""

    def __init__(self, model: str, prompt_tokens: int):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created, self.model, self.prompt_tokens = int(time.time()), model, prompt_tokens

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": None}

    def chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": _logprobs(logprobs), "finish_reason": finish}
        return _sse_line({**self.head(), "object": "chat.completion.chunk", "choices": [choice]})

    def usage_chunk(self, completion_tokens: int) -> str:
        body = {**self.head(), "object": "chat.completion.chunk", "choices": [], "usage": self.usage(completion_tokens)}
        return _sse_line(body)

    def completion(self, text: str, finish: str, completion_tokens: int, logprobs=None) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": _logprobs(logprobs), "finish_reason": finish}
        return {**self.head(), "object": "chat.completion", "choices": [choice], "usage": self.usage(completion_tokens)}


def _logprobs(tokens: list | None) -> dict | None:
    """OpenAI's choice.logprobs from (token text, log-probability, [(text, log-probability)])."""
    if not tokens:
        return None

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]} for t, lp, top in tokens]}


def _sse_line(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _failure(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, G3nError):
        return bad(str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def _sse(job: Job, reply: _Reply, include_usage: bool):
    """Server-sent events as OpenAI streams them. If the client leaves, Starlette cancels this
    generator and `finally` cancels the job: the worker drops the row before its next token."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield reply.chunk({"content": event[1]}, logprobs=event[2])
            elif event[0] == "done":
                yield reply.chunk({}, event[1])
                if include_usage:
                    yield reply.usage_chunk(event[2])
                break
            else:
                yield _sse_line(_failure(event[1]).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


async def _collect(job: Job, reply: _Reply, request: Request) -> dict:
    """The whole reply; checks twice a second whether the client is still there (and if not,
    cancels the job so its slot frees), also while pieces keep arriving."""
    pieces, logprobs = [], []
    get = asyncio.ensure_future(job.events.get())
    checked = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=0.5)
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return {}
            if not done:
                continue
            event = get.result()
            if event[0] == "text":
                pieces.append(event[1])
                logprobs += event[2] or []
            elif event[0] == "done":
                return reply.completion(
                    "".join(pieces), event[1], event[2], logprobs if job.logprobs is not None else None
                )
            else:
                raise _failure(event[1])
            get = asyncio.ensure_future(job.events.get())
    finally:
        get.cancel()
        job.cancel()
