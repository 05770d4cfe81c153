"""`g3n serve`: an OpenAI-compatible HTTP server (chat completions, streaming, models, health) and a
chat page, over any backend inference/backends.py opens. app.py: routes; schema.py and content.py: request
parsing; scheduler.py: the model's worker thread and queue; static/index.html: the page."""

from __future__ import annotations

from g3n.serve.app import Limits, create_app

__all__ = ["Limits", "create_app", "run_server"]


def run_server(engine, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
               api_key: str | None = None, log_level: str = "info") -> None:  # fmt: skip
    """Serve `engine` until interrupted (uvicorn, one process: the model lives in this one)."""
    import uvicorn

    uvicorn.run(create_app(engine, limits, api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)  # fmt: skip
