"""The one thread that owns the model, and the bounded queue in front of it.

Requests become `Job`s. The worker keeps up to `max_batch` jobs running on the engine and steps
it (continuous batching): a job that arrives while others generate joins at the next step (its
prompt prefilled in chunks between their decode steps), and a job that ends frees its place at
once (`batching="static"`, for comparison: a batch runs to its end before the next starts).
g3n's engine runs each row with its own sampling settings and seed, so a reply is the same
text it would be alone; llama.cpp (GGUF) runs one job at a time.

A job ends early when its client goes away or one of its stop strings appears: the worker checks
between steps and cancels it in the engine. Events go back to the asyncio side through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from g3n.errors import G3nError
from g3n.inference.sampling import SamplingParams


class QueueFull(Exception):
    pass


class StopStrings:
    """Cuts streamed text at the first stop string, holding back a tail that may start one.

    Each stop string is matched by a Knuth-Morris-Pratt automaton fed one character at a time, so
    the work is linear in the text and the stop strings' lengths, however long the reply."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fallback = [_kmp_table(s) for s in stops]
        self.states = [0] * len(stops)  # per stop string: how much of it the text now ends with
        self.pending = ""  # text held back: at most the longest stop string's length

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        for n, char in enumerate(text):
            hit = 0
            for i, stop in enumerate(self.stops):
                state, fallback = self.states[i], self.fallback[i]
                while state and stop[state] != char:
                    state = fallback[state - 1]
                state += stop[state] == char
                if state == len(stop):
                    hit = max(hit, state)  # several end here: cut at the longest (it starts first)
                    state = fallback[state - 1]
                self.states[i] = state
            if hit:
                held = self.pending + text[: n + 1]
                self.pending, self.states = "", [0] * len(self.stops)
                return held[: len(held) - hit], True
        held = self.pending + text
        keep = max(self.states)
        self.pending = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.states = [0] * len(self.stops)
        return out


def _kmp_table(s: str) -> list[int]:
    """table[i]: the length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request: its prompt and settings in, events out.

    Events: ("text", str, logprobs or None), ("done", finish_reason, completion_tokens),
    ("error", exception); logprobs: a list of (token text, log-probability, top alternatives).
    With a `prelude` (work on the model before the row joins the engine, such as scoring the
    prompt), its result comes first as ("prompt", result); with max_new_tokens 0 the job ends there.
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    media: dict | None = None  # image/audio tensors (media.py)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None, or how many alternatives to report with each token
    grammar: str | None = None  # what the reply must match (inference/grammar.py), from response_format
    adapter: str | None = None  # the served LoRA adapter it runs with (None: the base model)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request's side; read by the worker between tokens
    finished: bool = False
    stops: StopStrings | None = None  # the worker's, while it runs
    prelude: Callable[[], object] | None = None  # run on the worker thread, which owns the model
    queued: float = 0.0  # time.monotonic() when it was queued, and of its last token (metrics)
    last: float = 0.0
    count: int = 0  # tokens produced

    def cancel(self) -> None:
        self.cancelled = True

    async def whole(self, request) -> tuple[str, list, str, int] | None:
        """(the reply's text, its logprobs entries, finish reason, tokens generated), or None when
        the client left: checked twice a second, also while pieces keep arriving. The job is
        cancelled on the way out, so a departed client's place frees at once."""
        from g3n.serve.errors import failure

        pieces, logprobs = [], []
        get = asyncio.ensure_future(self.events.get())
        checked = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                if not done:
                    continue
                event = get.result()
                if event[0] == "text":
                    pieces.append(event[1])
                    logprobs += event[2] or []
                elif event[0] == "done":
                    return "".join(pieces), logprobs, event[1], event[2]
                else:
                    raise failure(event[1])
                get = asyncio.ensure_future(self.events.get())
        finally:
            get.cancel()
            self.cancel()

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class Scheduler:
    def __init__(self, engine, max_queue: int = 32, max_batch: int | None = None, batching: str = "continuous",
                 metrics=None):  # fmt: skip
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', not {batching!r}")
        self.engine, self.static = engine, batching == "static"
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch or engine.max_batch, engine.max_batch))
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # engine handle -> job
        self.largest_batch = 0
        self.completed = 0
        self.preparing: Job | None = None  # the job whose prelude the worker is running
        self.metrics = metrics  # metrics.Metrics: tokens counted and timed here
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="g3n-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self.waiting:
                job.emit("error", G3nError("the server is shutting down"))
            self.waiting.clear()
            self._cond.notify_all()
        for job in list(self.running.values()):
            job.cancel()
        self._thread.join(timeout=10)
        for handle in list(self.running):  # the engine may outlive this server
            self.engine.cancel(handle)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._drop_cancelled()
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            job.queued = time.monotonic()
            self.waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {
                "running": sum(not (j.cancelled or j.finished) for j in [*self.running.values(), self.preparing] if j),
                "waiting": sum(not j.cancelled for j in self.waiting),
                "max_batch": self.max_batch,
                "largest_batch": self.largest_batch,
                "completed": self.completed,
            }

    def _drop_cancelled(self) -> None:
        """Queued jobs whose clients left free their place at once."""
        if any(j.cancelled for j in self.waiting):
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def _admit(self) -> bool:
        """Start waiting jobs while there is room; wait while there is nothing to do. False: closed."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._closed:
                    return False
                if self.waiting or self.running:
                    break
                self._cond.wait()
            room = not (self.static and self.running)  # static: a batch runs to its end before the next
            prelude = None
            while room and self.waiting and len(self.running) < self.max_batch:
                job = self.waiting.popleft()
                if job.prelude is not None:  # run below, outside the lock: submit() must not wait for it
                    prelude = self.preparing = job
                    break
                self._start(job)
            self.largest_batch = max(self.largest_batch, len(self.running))
        if prelude is not None:
            self._run_prelude(prelude)
        return True

    def _start(self, job: Job) -> None:
        """Hand a job to the engine (under the lock); one that asks for no tokens ends at once."""
        if job.params.max_new_tokens == 0:
            job.finished = True
            self.completed += 1
            job.emit("done", "length", 0)
            if self.metrics is not None:
                self.metrics.started(len(job.prompt_ids))
            return
        try:
            handle = self.engine.submit(
                job.prompt_ids, job.params, job.media, job.logit_bias, job.logprobs, job.grammar, job.adapter
            )
        except Exception as e:  # noqa: BLE001 - a refused request fails alone
            job.finished = True
            job.emit("error", e)
            return
        self.running[handle] = job
        job.stops, job.count = StopStrings(job.stop), 0
        if self.metrics is not None:
            self.metrics.started(len(job.prompt_ids))

    def _run_prelude(self, job: Job) -> None:
        result = error = None
        try:
            result = job.prelude()
        except Exception as e:  # noqa: BLE001 - a failed prelude fails its request alone
            error = e
        with self._cond:
            self.preparing = None
            if error is not None:
                job.finished = True
                job.emit("error", error)
            elif not job.cancelled:
                job.emit("prompt", result)
                self._start(job)
            self.largest_batch = max(self.largest_batch, len(self.running))

    def _work(self) -> None:
        while self._admit():
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for handle, job in list(self.running.items()):
                    self._end(handle, job, error=e)

    def _end(self, handle: int, job: Job, reason: str | None = None, error: Exception | None = None) -> None:
        answered = not job.finished and not (job.cancelled and error is None and reason is None)
        with self._cond:
            self.running.pop(handle, None)
            self.completed += answered  # a request whose client left is not counted
        if answered:
            job.finished = True
            if error is not None:
                job.emit("error", error)
            else:
                if tail := job.stops.flush():
                    job.emit("text", tail, None)
                job.emit("done", reason, job.count)
        self.engine.cancel(handle)  # a no-op where the engine ended it

    def _step(self) -> None:
        for handle, job in list(self.running.items()):
            if job.cancelled:
                self._end(handle, job)
        for piece in self.engine.step():
            job = self.running.get(piece.handle)
            if job is None:
                continue
            if piece.finish == "stop" and not piece.text:
                self._end(piece.handle, job, "stop")
                continue
            job.count += 1
            if self.metrics is not None:
                now = time.monotonic()
                self.metrics.token(now - (job.queued if job.count == 1 else job.last), job.count == 1)
                job.last = now
            text, hit = job.stops.push(piece.text)
            logprobs = None
            if piece.logprob is not None:
                logprobs = [(piece.token, piece.logprob, piece.top)]
            if text or logprobs:
                job.emit("text", text, logprobs)
            if hit:
                job.stops.flush()
                self._end(piece.handle, job, "stop")
            elif piece.finish:
                self._end(piece.handle, job, piece.finish)
