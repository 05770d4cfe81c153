"""`g3n serve`: an OpenAI-compatible HTTP server (chat completions, streaming, models, health) and a
chat page, over any backend inference/backends.py opens. app.py: routes; schema.py and content.py: request
parsing; scheduler.py: the model's worker thread and queue; static/index.html: the page;
server.py: uvicorn's settings (connection limits, header timeout, a bounded log)."""

from __future__ import annotations

import contextlib

from g3n.serve.app import Limits, create_app

__all__ = ["Limits", "create_app", "run_server", "server_config"]


def server_config(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                  log_level: str = "info"):  # fmt: skip
    """uvicorn's Config for `app`, with the limits that keep one client from exhausting the server."""
    from g3n.serve.server import server_config as config

    return config(app, host, port, limits or Limits(), log_level)


def run_server(engine, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
               api_key: str | None = None, log_level: str = "info", allowed_hosts=(), cors_origins=()) -> None:  # fmt: skip
    """Serve `engine` until interrupted (uvicorn, one process: the model lives in this one). The
    host name given as `host` is allowed as a Host header beside `allowed_hosts`."""
    import uvicorn

    from g3n.serve.server import bound_log

    allowed = [*allowed_hosts, host]
    app = create_app(engine, limits, api_key, allowed, cors_origins)
    config = server_config(app, host, port, limits, log_level)
    with bound_log(), contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        uvicorn.Server(config).run()
