"""OpenAI's legacy `POST /v1/completions`: raw prompts (strings or token ids, one or a batch), `echo`,
`logprobs` in the legacy shape (tokens, token_logprobs, top_logprobs, text_offset), streamed or not.

Generation runs through the same scheduler and engine as chat. The prompt's own log-probabilities
(`echo` with `logprobs`: lm-eval's loglikelihood request) come from one full forward of the model,
which the scheduler's worker thread runs before the row joins the engine, so it never races it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from g3n.errors import G3nError
from g3n.inference.sampling import SamplingParams
from g3n.serve.errors import bad, busy, failure
from g3n.serve.scheduler import Job, QueueFull
from g3n.serve.schema import integer_field, parse_body, parse_chat_request

MAX_PROMPTS = 2048  # prompts in one request (OpenAI's limit)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's legacy limit is 5; the engine reports up to 20)
SCORE_CHUNK = 256  # positions whose logits are materialised at once when scoring a prompt

# fields of the chat request that mean nothing here (the prompt replaces them) or differ in meaning
_NOT_CHAT = ("prompt", "messages", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "echo",
             "suffix", "best_of", "response_format")  # fmt: skip


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None  # None, or how many alternatives each token reports
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    logit_bias: dict[int, float] | None
    model: str  # the id asked for: the base model's or a served adapter's


def parse_completion_request(body: dict, model_name: str | list[str], max_tokens_default: int) -> CompletionRequest:
    """Check a /v1/completions body. The sampling fields are read exactly as chat reads them."""
    prompts = _prompts(body.get("prompt"))
    echo = body.get("echo", False)
    if echo is not None and not isinstance(echo, bool):
        raise bad("'echo' must be true or false", "echo")
    logprobs = integer_field(body, "logprobs", 0, MAX_LOGPROBS, None)
    max_tokens = integer_field(body, "max_tokens", 0, 2**31 - 1, max_tokens_default)
    suffix = body.get("suffix")
    if suffix not in (None, ""):
        raise bad("'suffix' (insertion) is not supported by this server", "suffix", "unsupported")
    integer_field(body, "best_of", 1, 1, None)  # only 1: checked, nothing to keep
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("'response_format' is for /v1/chat/completions; completions take plain text", "response_format",
                  "unsupported")  # fmt: skip
    chat = {k: v for k, v in body.items() if k not in _NOT_CHAT} | {"messages": [{"role": "user", "content": ""}]}
    req = parse_chat_request(chat, model_name, 1)
    params = dataclasses.replace(req.params, max_new_tokens=max_tokens)
    return CompletionRequest(prompts, bool(echo), logprobs, params, req.stop, req.stream, req.include_usage,
                             req.logit_bias, req.model)  # fmt: skip


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of token ids, or a list of either (a batch)."""
    shape = "a string, a list of token ids, or a list of strings or of token-id lists"
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"'prompt' is required: {shape}", "prompt")
    if all(_token(t) for t in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} a request", "prompt")
    for n, p in enumerate(prompt):
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(_token(t) for t in p))
        if not ok:
            raise bad(f"prompt[{n}] must be a string or a non-empty list of token ids ('prompt' is {shape})", "prompt")
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def encode_prompt(engine, prompt: str | list[int], n: int) -> tuple[list[int], int]:
    """(the ids the model reads, how many leading ids are g3n's and not echoed). A string is
    encoded with one BOS; a token list is read as sent, after a BOS when it does not start with one
    (Gemma without it is another model), and only the ids sent are echoed."""
    where = "prompt" if n == 0 else f"prompt[{n}]"
    tok = getattr(engine, "tok", None)
    if isinstance(prompt, str):
        try:
            return engine.encode(prompt), 0
        except G3nError as e:
            raise bad(f"{where}: {e}", "prompt") from None
    if tok is None:
        raise bad("token-id prompts need g3n's engine (an HF checkpoint); send text to a GGUF model", "prompt",
                  "unsupported")  # fmt: skip
    vocab = engine.model.config.vocab_size
    if outside := [t for t in prompt if t >= vocab]:
        raise bad(f"{where} holds token {outside[0]}, outside the vocabulary (0..{vocab - 1})", "prompt")
    if prompt[0] == tok.bos_id:
        return prompt, 0
    return [tok.bos_id, *prompt], 1


@torch.inference_mode()
def score_prompt(engine, ids: list[int], top: int) -> list[tuple[str, float | None, list[tuple[str, float]]]]:
    """Each prompt token's text, log-probability given the tokens before it (None for the first)
    and the `top` most likely tokens there, from one forward of the model (logits a chunk of
    positions at a time: never the whole prompt times the vocabulary)."""
    from g3n.inference.engine import logprob_outputs
    from g3n.inference.generate import TextStreamer

    model, tok = engine.model, engine.tok
    x = torch.tensor([ids], device=model.device)
    hidden = model.model(x)[0]
    streamer = TextStreamer(tok)
    out = [(streamer.push(ids[0]), None, [])]
    for start in range(0, len(ids) - 1, SCORE_CHUNK):
        end = min(start + SCORE_CHUNK, len(ids) - 1)
        logits = model.logits(hidden[start:end])
        lps, top_ids, top_lps = logprob_outputs(logits, x[0, start + 1 : end + 1])
        for lp, alt_ids, alt_lps in zip(lps.tolist(), top_ids[:, :top].tolist(), top_lps[:, :top].tolist()):
            token = ids[len(out)]
            out.append((streamer.push(token), lp, [(tok.decode([i]), v) for i, v in zip(alt_ids, alt_lps)]))
    return out


class _Choice:
    """One prompt's completion as OpenAI's legacy shape builds it: text, and with logprobs the
    per-token lists, text offsets counted in the choice's text."""

    def __init__(self, index: int, echo_text: str, logprobs: int | None, scored: bool):
        self.index, self.text, self.want = index, echo_text, logprobs
        self.offset = 0 if scored else len(echo_text)  # scored: the prompt's tokens come first
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add_prompt(self, tokens) -> dict | None:
        part = self.add_tokens(tokens)
        self.offset = len(self.text)  # new tokens start after the echoed text
        return part

    def add_tokens(self, tokens) -> dict | None:
        """Record (text, logprob, top) tokens; their legacy-shaped lists for a stream chunk."""
        if self.want is None or not tokens:
            return None
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, lp, top in tokens:
            alternatives = None
            if lp is not None:
                alternatives = dict(top)
                alternatives.setdefault(text, lp)  # the token itself is always there, as OpenAI's
            for key, value in zip(part, (text, lp, alternatives, self.offset)):
                part[key].append(value)
            self.offset += len(text)
        for key, values in zip(("tokens", "token_logprobs", "top_logprobs", "text_offset"), part.values()):
            getattr(self, key).extend(values)
        return part

    def logprobs(self) -> dict | None:
        if self.want is None:
            return None
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}  # fmt: skip


def completions_route(engine, names: list[str], scheduler, max_tokens_default: int, max_prompt: int, read_body):
    """The /v1/completions handler over the app's engine (serving the model ids `names`: the base
    model, then LoRA adapters) and scheduler."""

    def prepare(body: dict):
        req = parse_completion_request(body, names, max_tokens_default)
        if len(req.prompts) > scheduler.max_queue:  # queued at once: more could never be taken
            raise bad(f"'prompt' holds {len(req.prompts)} prompts; this server queues at most {scheduler.max_queue} "
                      "(--max-queue): send fewer a request", "prompt")  # fmt: skip
        if req.echo and req.logprobs is not None and getattr(engine, "model", None) is None:
            raise bad("echo with logprobs (the prompt's log-probabilities) needs g3n's engine (an HF checkpoint)",
                      "logprobs", "unsupported")  # fmt: skip
        if req.echo and req.logprobs is not None and req.model != engine.name:
            raise bad("echo with logprobs scores the prompt with the base model only, not an adapter", "model",
                      "unsupported")  # fmt: skip
        encoded = [encode_prompt(engine, p, n) for n, p in enumerate(req.prompts)]
        for n, (ids, _) in enumerate(encoded):
            if len(ids) > max_prompt:
                where = "prompt" if len(encoded) == 1 else f"prompt[{n}]"
                raise bad(f"{where} is {len(ids)} tokens; this server takes at most {max_prompt} (model context "
                          f"{engine.context_length}, --max-prompt-tokens)", "prompt",
                          "context_length_exceeded")  # fmt: skip
        texts = [p if isinstance(p, str) else engine.tok.decode(p) for p in req.prompts] if req.echo else None
        return req, encoded, texts

    async def handler(request: Request):
        body = parse_body(await read_body(request))
        req, encoded, texts = await run_in_threadpool(prepare, body)
        loop = asyncio.get_running_loop()
        jobs = []
        for ids, skip in encoded:
            prelude = None
            if req.echo and req.logprobs is not None:
                prelude = _scorer(engine, ids, req.logprobs, skip)
            adapter = None if req.model == engine.name else req.model
            jobs.append(Job(ids, req.params, req.stop, loop, None, req.logit_bias, req.logprobs, adapter=adapter,
                            prelude=prelude))  # fmt: skip
        try:
            for job in jobs:
                scheduler.submit(job)
        except QueueFull as e:
            for job in jobs:
                job.cancel()
            raise busy(str(e)) from None
        reply = _Reply(req.model, sum(len(ids) for ids, _ in encoded))
        choices = [_Choice(n, texts[n] if texts else "", req.logprobs, job.prelude is not None)
                   for n, job in enumerate(jobs)]  # fmt: skip
        if req.stream:
            return StreamingResponse(_stream(jobs, choices, reply, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return JSONResponse(await _collect(jobs, choices, reply, request))

    return handler


def _scorer(engine, ids: list[int], top: int, skip: int):
    return lambda: score_prompt(engine, ids, top)[skip:]


class _Reply:
    def __init__(self, model: str, prompt_tokens: int):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.prompt_tokens = prompt_tokens

    def body(self, choices: list[dict], usage: int | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": choices}  # fmt: skip
        if usage is not None:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": usage,
                            "total_tokens": self.prompt_tokens + usage}  # fmt: skip
        return out


async def _events(jobs: list[Job]):
    """(job index, event) as they arrive from all the jobs, until each has ended."""
    gets = {asyncio.ensure_future(job.events.get()): n for n, job in enumerate(jobs)}
    try:
        while gets:
            done, _ = await asyncio.wait(gets, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None, None  # a tick: lets the caller check on its client
            for get in done:
                n = gets.pop(get)
                event = get.result()
                yield n, event
                if event[0] == "prompt" or event[0] == "text":
                    gets[asyncio.ensure_future(jobs[n].events.get())] = n
    finally:
        for get in gets:
            get.cancel()


async def _collect(jobs: list[Job], choices: list[_Choice], reply: _Reply, request: Request) -> dict:
    """Every prompt's whole completion; a client that left cancels them all (checked twice a second)."""
    finish, count, checked = [None] * len(jobs), 0, time.monotonic()
    try:
        async for n, event in _events(jobs):
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return {}
            if n is None:
                continue
            if event[0] == "prompt":
                choices[n].add_prompt(event[1])
            elif event[0] == "text":
                choices[n].text += event[1]
                choices[n].add_tokens(event[2])
            elif event[0] == "done":
                finish[n], count = event[1], count + event[2]
            else:
                raise failure(event[1])
    finally:
        for job in jobs:
            job.cancel()
    out = [{"index": c.index, "text": c.text, "logprobs": c.logprobs(), "finish_reason": f}
           for c, f in zip(choices, finish)]  # fmt: skip
    return reply.body(out, count)


def _chunk(reply: _Reply, index: int, text: str, logprobs=None, finish=None) -> str:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return f"data: {json.dumps(reply.body([choice]), ensure_ascii=False)}\n\n"


async def _stream(jobs: list[Job], choices: list[_Choice], reply: _Reply, include_usage: bool):
    """Server-sent events as OpenAI streams completions: each chunk one choice's new text (the echoed
    prompt first), then `[DONE]`. A client that leaves cancels every prompt's job."""
    count, echoed = 0, set()
    try:
        for c in choices:  # the echo, when no prompt scoring sends it with its logprobs
            if c.text and jobs[c.index].prelude is None:
                yield _chunk(reply, c.index, c.text)
                echoed.add(c.index)
        async for n, event in _events(jobs):
            if n is None:
                continue
            if event[0] == "prompt":
                yield _chunk(reply, n, choices[n].text, choices[n].add_prompt(event[1]))
            elif event[0] == "text":
                yield _chunk(reply, n, event[1], choices[n].add_tokens(event[2]))
            elif event[0] == "done":
                count += event[2]
                yield _chunk(reply, n, "", None, event[1])
            else:
                yield f"data: {json.dumps(failure(event[1]).body())}\n\n"
                break
        if include_usage:
            yield f"data: {json.dumps(reply.body([], count))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()
