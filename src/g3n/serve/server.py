"""uvicorn's settings for `g3n serve`: what keeps one client from exhausting the server.

uvicorn bounds idle kept-alive connections (`timeout_keep_alive`) and answers 503 past
`limit_concurrency` connections, but has no timeout for a request's headers: a connection that
sends half a request stays open for ever, and enough of them exhaust the file descriptors. Its
h11 protocol is used here with that timeout added. Logs that a flood repeats (uvicorn's warnings,
asyncio's accept errors with their tracebacks) pass at a bounded rate.
"""

from __future__ import annotations

import contextlib
import logging
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from g3n.serve.app import Limits

MAX_HEADER_BYTES = 16 * 2**10  # a request line and headers (h11's own default, stated)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived `header_timeout` seconds after the connection opened, or after the first byte of a
    later request on a kept-alive connection."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        self._head_timer = None
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)
        elif not waiting:
            self._stop_head_timer()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_config(app, host: str, port: int, limits: Limits, log_level: str) -> uvicorn.Config:
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": limits.header_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        ws="none",
        lifespan="on",
        timeout_keep_alive=limits.keep_alive,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=5,
    )


class RateLimit(logging.Filter):
    """At most `burst` records of one message (its logger and first line) per `window` seconds;
    the first record after a quiet window says how many were dropped."""

    def __init__(self, burst: int = 20, window: float = 60.0):
        super().__init__()
        self.burst, self.window = burst, window
        self.seen: dict[tuple, list] = {}  # key -> [window start, records in it, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg).partition("\n")[0][:100])
        now = time.monotonic()
        if len(self.seen) > 1000:
            self.seen.clear()
        entry = self.seen.setdefault(key, [now, 0, 0])
        if now - entry[0] >= self.window:
            if entry[2]:
                record.msg = f"({entry[2]} similar messages dropped) {record.msg}"
            entry[:] = [now, 0, 0]
        entry[1] += 1
        if entry[1] > self.burst:
            entry[2] += 1
            return False
        return True


@contextlib.contextmanager
def bound_log(names=("uvicorn.error", "asyncio")):
    """Rate-limit the loggers a flood of bad connections writes to, while serving."""
    loggers, limit = [logging.getLogger(n) for n in names], RateLimit()
    for logger in loggers:
        logger.addFilter(limit)
    try:
        yield limit
    finally:
        for logger in loggers:
            logger.removeFilter(limit)
