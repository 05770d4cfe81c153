"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4),
written by hand: a few counters, two gauges read at scrape time and two histograms need no library.

The scheduler's worker counts tokens and times them (`Metrics.started`, `token`); `Counted`, an
ASGI middleware around the whole app, counts every response by route and status, refusals included.
"""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
METHODS = ("GET", "HEAD", "POST", "OPTIONS", "PUT", "PATCH", "DELETE")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/translations",
          "/v1/models", "/health", "/metrics", "/")  # fmt: skip


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What the server has done since it started; safe to update from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.responses: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TOKEN_BUCKETS)

    def response(self, method: str, path: str, status: int) -> None:
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        method = method if method in METHODS else "other"  # labels from a bounded set, whatever clients send
        with self._lock:
            key = (method, route, status)
            self.responses[key] = self.responses.get(key, 0) + 1

    def started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def token(self, since: float, first: bool) -> None:
        """A new token, `since` seconds after the request was queued (first) or its last token."""
        with self._lock:
            self.completion_tokens += 1
            (self.ttft if first else self.per_token).observe(since)

    def render(self, stats: dict) -> str:
        """The text format; `stats`: the scheduler's (running, waiting, ...), read now."""
        with self._lock:
            out = ["# HELP g3n_requests_total HTTP responses by method, route and status.",
                   "# TYPE g3n_requests_total counter"]  # fmt: skip
            for (method, route, status), n in sorted(self.responses.items()):
                out.append(f'g3n_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            for name, what, value in (
                ("g3n_prompt_tokens_total", "Prompt tokens of requests the model started on.", self.prompt_tokens),
                ("g3n_completion_tokens_total", "Tokens generated.", self.completion_tokens),
            ):
                out += [f"# HELP {name} {what}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, what, value in (
                ("g3n_requests_running", "Requests the model is generating now (batch rows).", stats["running"]),
                ("g3n_requests_waiting", "Requests waiting in the queue.", stats["waiting"]),
                ("g3n_max_batch", "Requests generated together at most (--max-batch).", stats["max_batch"]),
            ):
                out += [f"# HELP {name} {what}", f"# TYPE {name} gauge", f"{name} {value}"]
            for name, what, hist in (
                ("g3n_time_to_first_token_seconds", "From a request's queueing to its first token.", self.ttft),
                ("g3n_time_per_output_token_seconds", "Between a request's consecutive tokens.", self.per_token),
            ):
                out += [f"# HELP {name} {what}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"


class Counted:
    """ASGI middleware: every HTTP response counted by method, route and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.response(scope["method"], scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)
