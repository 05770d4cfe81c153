"""The HTTP side of `g3n serve` (Starlette): OpenAI's chat-completions and models routes, a health
route, and the chat page at /. Generation happens on the scheduler's thread; handlers only parse,
queue and relay events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from g3n.errors import G3nError
from g3n.inference.backends import check_modalities
from g3n.serve.audio import FORM_PATHS, audio_routes
from g3n.serve.completions import completions_route
from g3n.serve.errors import APIError, bad, busy, failure
from g3n.serve.metrics import Counted, Metrics
from g3n.serve.scheduler import Job, QueueFull, Scheduler
from g3n.serve.schema import ChatRequest, parse_body, parse_chat_request
from g3n.tool_calls import CallStream


@dataclass
class Limits:
    max_queue: int = 32  # requests waiting beyond the running batch; more get 429
    max_batch: int = 8  # requests generated together (g3n's engine; GGUF: 1)
    batching: str = "continuous"  # or "static": a batch runs to its end before the next starts
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_tokens: int = 1024  # a request's max_tokens when it gives none
    max_body_bytes: int = 20 * 2**20  # request bodies (base64 images and audio count here)
    body_timeout: float = 120.0  # seconds a request body may take to arrive; then 408
    media_decoders: int = 2  # requests decoding images/audio at once (each within content.py's budgets)
    # uvicorn's side (serve.server_config):
    max_connections: int = 256  # open connections (and running requests); past it, 503
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers; then closed
    keep_alive: float = 5.0  # seconds an idle kept-alive connection stays open

    def __post_init__(self):
        whole = {"max_queue": 1, "max_batch": 1, "max_tokens": 1, "max_body_bytes": 1, "media_decoders": 1,
                 "max_connections": 1, "max_prompt_tokens": 1}  # fmt: skip
        for name, low in whole.items():
            value = getattr(self, name)
            if value is None and name == "max_prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise G3nError(f"invalid {name}: {value!r} (must be an integer >= {low})")
        if self.batching not in ("continuous", "static"):
            raise G3nError(f"invalid batching: {self.batching!r} (continuous or static)")
        for name in ("body_timeout", "header_timeout", "keep_alive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise G3nError(f"invalid {name}: {value!r} (must be a finite number of seconds > 0)")


def _error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def check_api_key(key: str | None) -> None:
    """An empty key (say, from an unset shell variable) would turn authentication off: refuse it."""
    if key is not None and (not key.strip() or key != key.strip()):
        raise G3nError("the API key is empty or starts or ends with whitespace: give a real key (--api-key or "
                       "$G3N_API_KEY), or none to serve without one")  # fmt: skip


LOOPBACK_NAMES = {"localhost"}


def host_name(header: str) -> str:
    """The name in a Host header, without the port, lower case, without a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        name = header[1 : header.find("]")] if "]" in header else header
    else:
        name, colon, port = header.rpartition(":")
        name = name if colon and port.isdigit() else header
    return name.rstrip(".")


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """An IP address or `localhost` always (a page can only send those as its own origin's name,
    so DNS rebinding never does), other names only when allowed (`*`: any)."""
    if header is None or "*" in allowed:
        return True
    name = host_name(header)
    if name in LOOPBACK_NAMES or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware against cross-site use from a browser: the Host must name this server
    (DNS rebinding: a page on another name reading replies), and requests with a body must be
    `application/json`, which a cross-origin page can only send after a CORS preflight that this
    server grants only to --cors-origin origins, so another page cannot make it generate (the audio
    routes take multipart forms and refuse other origins' pages themselves: audio.py)."""

    def __init__(self, app, allowed_hosts=()):
        self.app, self.allowed = app, frozenset(host_name(h) if h != "*" else h for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if not host_allowed(None if host is None else host.decode("latin-1"), self.allowed):
            e = APIError(421, f"this server does not answer to the host name {host.decode('latin-1')[:100]!r}; "
                         "start g3n serve with --allowed-host NAME to allow it", code="invalid_host")  # fmt: skip
            return await _error(e)(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            kind = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if kind != "application/json" and scope["path"] not in FORM_PATHS:
                e = APIError(415, f"{scope['method']} {scope['path']} takes a JSON body: send 'Content-Type: "
                             f"application/json' (got {kind or 'none'!r})", code="unsupported_media_type")  # fmt: skip
                return await _error(e)(scope, receive, send)
        return await self.app(scope, receive, send)


class APIKey:
    """ASGI middleware: every route but /health needs the key, as `Authorization: Bearer KEY`, or as
    HTTP Basic auth's password (any user name), which is how a browser opening the chat page
    sends it: the 401 asks the browser for it, and it then sends it with the page's requests."""

    def __init__(self, app, key: str | None):
        check_api_key(key)
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


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused past `limit` bytes (413) or `timeout` seconds (408: a client trickling
    its body holds a connection and a task)."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-body-mb)",
                       code="request_too_large")  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None  # fmt: skip
    return b"".join(chunks)


def create_app(engine, limits: Limits | None = None, api_key: str | None = None, allowed_hosts=(),
               cors_origins=()) -> Starlette:  # fmt: skip
    """The ASGI app for one loaded engine; its scheduler thread starts and stops with the app.
    `allowed_hosts`: host names (beyond IP addresses and localhost) the server answers to; `*`: any.
    `cors_origins`: origins of browser apps allowed to call the API (`*`: any); none by default."""
    limits = limits or Limits()
    check_api_key(api_key)
    media_gate = threading.BoundedSemaphore(limits.media_decoders)
    metrics = Metrics()
    scheduler = Scheduler(engine, limits.max_queue, limits.max_batch, limits.batching, metrics)
    max_prompt = min(limits.max_prompt_tokens or engine.context_length - 1, engine.context_length - 1)
    created = int(time.time())
    page = resources.files("g3n.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    names = [engine.name, *getattr(engine, "adapter_names", [])]  # the base model, then served adapters

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "g3n",
                "modalities": sorted(engine.modalities), "context_length": engine.context_length}  # fmt: skip
        return card if name == engine.name else card | {"parent": engine.name}  # a LoRA adapter of it

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.name, **scheduler.stats()})

    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(scheduler.stats()), media_type="text/plain; version=0.0.4")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    async def model(request: Request):
        name = request.path_params["model"]
        if name not in names:
            raise APIError(404, f"The model '{name}' does not exist; this server runs {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")  # fmt: skip
        return JSONResponse(model_card(name))

    def prepare(body: dict) -> tuple[ChatRequest, list[int], dict | None]:
        """Parse, decode media, tokenize and run the media processor (in a worker thread: images
        can take a while). Media the model cannot take is refused before it is decoded, and at
        most `media_decoders` requests hold decoded media at once."""
        holding = False

        def accept(kinds: set[str]) -> None:
            nonlocal holding
            try:
                check_modalities(engine, kinds)
            except G3nError as e:
                raise bad(str(e), "messages", "unsupported_modality") from None
            if kinds & {"image", "audio"}:
                holding = media_gate.acquire()

        try:
            req = parse_chat_request(body, names, limits.max_tokens, accept)
            try:
                ids, media = engine.prepare(req.messages)
            except G3nError as e:
                raise bad(str(e), "messages") from None
            finally:
                req.messages = []  # decoded images and audio: freed now, not when the reply ends
        finally:
            if holding:
                media_gate.release()
        if not getattr(engine, "grammars", False):
            if req.grammar is not None:
                raise bad(f"'response_format' needs g3n's engine (an HF checkpoint); {engine.name} runs in llama.cpp",
                          "response_format", "unsupported")  # fmt: skip
            if req.tools is not None and req.tools.forced:
                raise bad(f"'tool_choice' {req.tools.choice!r} needs g3n's engine (an HF checkpoint) to promise a "
                          f"call; {engine.name} runs in llama.cpp (tool_choice auto works there)", "tool_choice",
                          "unsupported")  # fmt: skip
        if len(ids) > max_prompt:
            raise bad(f"the prompt is {len(ids)} tokens; this server takes at most {max_prompt} "
                      f"(model context {engine.context_length}, --max-prompt-tokens)", "messages",
                      "context_length_exceeded")  # fmt: skip
        return req, ids, media

    async def chat_completions(request: Request):
        body = parse_body(await _read_body(request, limits.max_body_bytes, limits.body_timeout))
        req, ids, media = await run_in_threadpool(prepare, body)
        adapter = None if req.model == engine.name else req.model
        grammar = req.grammar
        if req.tools is not None and getattr(engine, "grammars", False):
            grammar = req.tools.grammar
        job = Job(ids, req.params, req.stop, asyncio.get_running_loop(), media, req.logit_bias, req.logprobs,
                  grammar, adapter)  # fmt: skip
        calls = None  # reads calls out of the reply (tool_calls.py)
        if req.tools is not None and req.tools.choice != "none":
            calls = CallStream(req.tools.names, streamed=grammar is not None)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise busy(str(e)) from None
        reply = _Reply(req.model, len(ids))
        if req.stream:
            return StreamingResponse(_sse(job, reply, req.include_usage, calls), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return JSONResponse(await _collect(job, reply, request, calls))

    def read_body(request: Request):
        return _read_body(request, limits.max_body_bytes, limits.body_timeout)

    completions = completions_route(engine, names, scheduler, limits.max_tokens, max_prompt, read_body)
    transcriptions, translations = audio_routes(engine, names, scheduler, limits.max_tokens, max_prompt, read_body,
                                                media_gate, cors_origins)  # fmt: skip

    async def on_api_error(request: Request, e: APIError):
        return _error(e, e.headers)

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
            Route("/metrics", prometheus),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/translations", translations, methods=["POST"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    inner = APIKey(app, api_key) if api_key is not None else app
    return Counted(Guard(cors(inner, cors_origins), allowed_hosts), metrics)


def cors(app, origins=()):
    """Starlette's CORS middleware for the given origins (outside the key check: a browser's
    preflight carries no credentials); without origins, no CORS headers at all."""
    if not origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    bad_origins = [o for o in origins if o != "*" and (not o.startswith(("http://", "https://")) or o.endswith("/"))]
    if bad_origins:
        raise G3nError(f"invalid CORS origin {bad_origins[0]!r}: give scheme://host[:port], e.g. "
                       "https://app.example.com, or '*'")  # fmt: skip
    return CORSMiddleware(app, allow_origins=list(origins), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip


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

    def completion(self, text: str | None, finish: str, completion_tokens: int, logprobs=None, tool_calls=None) -> dict:
        message = {"role": "assistant", "content": text} | ({"tool_calls": tool_calls} if tool_calls else {})
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


_failure = failure


def _finish(reason: str, calls: list | None) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


async def _sse(job: Job, reply: _Reply, include_usage: bool, calls: CallStream | None = None):
    """Server-sent events as OpenAI streams them; with tools, a reply that calls them streams as
    `tool_calls` deltas. If the client leaves, Starlette cancels this generator and `finally`
    cancels the job: the worker drops the row before its next token."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "text" and calls is None:
                yield reply.chunk({"content": event[1]}, logprobs=event[2])
            elif event[0] == "text":
                deltas = calls.push(event[1]) or ([{}] if event[2] else [])
                for n, delta in enumerate(deltas):
                    yield reply.chunk(delta, logprobs=event[2] if n == 0 else None)
            elif event[0] == "done":
                made = None
                if calls is not None:
                    rest, made = calls.finish()
                    for delta in rest:
                        yield reply.chunk(delta)
                yield reply.chunk({}, _finish(event[1], made))
                if include_usage:
                    yield reply.usage_chunk(event[2])
                break
            else:
                yield _sse_line(_failure(event[1]).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


async def _collect(job: Job, reply: _Reply, request: Request, calls: CallStream | None = None) -> dict:
    """The whole reply (with tools, its calls as `tool_calls`); {} when the client left."""
    result = await job.whole(request)
    if result is None:
        return {}
    text, logprobs, finish, count = result
    made = None
    if calls is not None:
        calls.push(text)
        made = calls.finish()[1]
    return reply.completion(None if made else text, _finish(finish, made), count,
                            logprobs if job.logprobs is not None else None, [c.openai() for c in made or []])  # fmt: skip
