"""The serve tests' engine and server, one of each per test module. A module sets MAX_BATCH (the
engine's, default 4) or APP_OPTIONS (create_app's keyword arguments, default none) for others."""

import pytest

from helpers import ServerThread


@pytest.fixture(scope="module")
def engine(tiny, request):
    """TorchEngine on the tiny model."""
    from g3n.inference.backends import TorchEngine

    model, tok = tiny
    return TorchEngine(model, tok, "tiny", max_batch=getattr(request.module, "MAX_BATCH", 4))


@pytest.fixture(scope="module")
def server(engine, request):
    """create_app(engine) served by uvicorn on loopback (a ServerThread)."""
    from g3n.serve import create_app

    with ServerThread(create_app(engine, **getattr(request.module, "APP_OPTIONS", {}))) as s:
        yield s
