"""OpenAI's error format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request problem, naming the field."""
    return APIError(400, message, param=param, code=code)


RETRY_AFTER_S = 1  # what a 429 asks clients to wait: a place frees as soon as any running reply ends


def busy(reason: str) -> APIError:
    """The 429 of a full queue, with Retry-After (OpenAI's clients honour it)."""
    return APIError(429, f"the server is busy: {reason}; retry shortly", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


def failure(e: Exception) -> APIError:
    """What a request that failed while generating answers."""
    from g3n.errors import G3nError

    if isinstance(e, APIError):
        return e
    if isinstance(e, G3nError):
        return bad(str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
