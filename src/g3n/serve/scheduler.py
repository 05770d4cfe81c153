"""The one thread that owns the model, and the bounded queue in front of it.

Requests become `Job`s. The worker keeps up to `max_batch` jobs running on the engine and steps
it (continuous batching): a job that arrives while others generate joins at the next step (its
prompt prefilled in chunks between their decode steps), and a job that ends frees its place at
once. g3n's engine runs each row with its own sampling settings and seed, so a reply is the same
text it would be alone; llama.cpp (GGUF) runs one job at a time.

A job ends early when its client goes away or one of its stop strings appears: the worker checks
between steps and cancels it in the engine. Events go back to the asyncio side through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

from g3n.errors import G3nError
from g3n.inference.sampling import SamplingParams


class QueueFull(Exception):
    pass


class StopStrings:
    """Cuts streamed text at the first stop string, holding back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request: its prompt and settings in, events out.

    Events: ("text", str, logprobs or None), ("done", finish_reason, completion_tokens),
    ("error", exception); logprobs: a list of (token text, log-probability, top alternatives).
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    media: dict | None = None  # image/audio tensors (media.py)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None, or how many alternatives to report with each token
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request's side; read by the worker between tokens
    finished: bool = False
    stops: StopStrings | None = None  # the worker's, while it runs
    count: int = 0  # tokens produced

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class Scheduler:
    def __init__(self, engine, max_queue: int = 32, max_batch: int | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch or engine.max_batch, engine.max_batch))
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # engine handle -> job
        self.largest_batch = 0
        self.completed = 0
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
            self.waiting.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {
                "running": sum(not (j.cancelled or j.finished) for j in self.running.values()),
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
            while self.waiting and len(self.running) < self.max_batch:
                job = self.waiting.popleft()
                try:
                    handle = self.engine.submit(job.prompt_ids, job.params, job.media, job.logit_bias, job.logprobs)
                except Exception as e:  # noqa: BLE001 - a refused request fails alone
                    job.finished = True
                    job.emit("error", e)
                    continue
                self.running[handle] = job
                job.stops, job.count = StopStrings(job.stop), 0
            self.largest_batch = max(self.largest_batch, len(self.running))
            return True

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
            text, hit = job.stops.push(piece.text)
            logprobs = None
            if piece.logprob is not None:
                logprobs = [(piece.token, piece.logprob, piece.top)]
            if text or logprobs:
                job.emit("text", text, logprobs)
            if hit:
                job.stops.pending = ""
                self._end(piece.handle, job, "stop")
            elif piece.finish:
                self._end(piece.handle, job, piece.finish)
