"""The one thread that owns the model, and the bounded queue in front of it.

Requests become `Job`s. The worker takes every waiting job (up to the engine's `max_batch`) and
runs them as one batch through `engine.run_batch`: g3n's engine generates them together, each row
with its own sampling settings and seed, so a reply is the same text it would be alone. Jobs that
arrive while a batch runs wait for the next one (static batching: the KV cache has one shape per
batch). A job with images or audio runs in a batch of its own (exactly the path `g3n generate
--image` takes); llama.cpp (GGUF) takes one job at a time.

A job ends early when its client goes away or one of its stop strings appears: the worker checks
between tokens, that row stops, and the batch ends when all its rows have. Events go back to the
asyncio side through `loop.call_soon_threadsafe`.
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

    Events: ("text", str), ("done", finish_reason, completion_tokens), ("error", exception).
    """

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    media: dict | None = None  # image/audio tensors (media.py); such a job runs in a batch of its own
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request's side; read by the worker between tokens
    finished: bool = False

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
        self.running: list[Job] = []
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
        for job in self.running:
            job.cancel()
        self._thread.join(timeout=10)

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
                "running": sum(not (j.cancelled or j.finished) for j in self.running),
                "waiting": sum(not j.cancelled for j in self.waiting),
                "max_batch": self.max_batch,
                "largest_batch": self.largest_batch,
                "completed": self.completed,
            }

    def _drop_cancelled(self) -> None:
        """Queued jobs whose clients left free their place at once."""
        if any(j.cancelled for j in self.waiting):
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._closed:
                    return None
                if self.waiting:
                    break
                self._cond.wait()
            batch = [self.waiting.popleft()]
            if batch[0].media is None:  # text jobs batch together; jobs with media wait their turn
                text = [j for j in self.waiting if j.media is None][: self.max_batch - 1]
                self.waiting = collections.deque(j for j in self.waiting if j not in text)
                batch += text
            self.running = batch
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for job in batch:
                    if not job.finished:
                        job.finished = True
                        job.emit("error", e)
            finally:
                with self._cond:
                    self.completed += sum(j.finished for j in batch)
                    self.running = []

    def _run(self, batch: list[Job]) -> None:
        stops = [StopStrings(job.stop) for job in batch]
        counts = [0] * len(batch)

        def finish(row: int, reason: str) -> None:
            job = batch[row]
            if tail := stops[row].flush():
                job.emit("text", tail)
            job.finished = True
            job.emit("done", reason, counts[row])

        def stopped(row: int) -> bool:
            return batch[row].finished or batch[row].cancelled

        prompts = [job.prompt_ids for job in batch]
        media = batch[0].media if len(batch) == 1 else None
        for piece in self.engine.run_batch(prompts, [job.params for job in batch], stopped, media):
            row, job = piece.row, batch[piece.row]
            if stopped(row):
                continue
            if piece.finish:
                finish(row, piece.finish)
                continue
            counts[row] += 1
            text, hit = stops[row].push(piece.text)
            if text:
                job.emit("text", text)
            if hit:
                stops[row].pending = ""
                finish(row, "stop")
        for row, job in enumerate(batch):  # the engine ran out of tokens for the row (context full)
            if not stopped(row):
                finish(row, "length")
