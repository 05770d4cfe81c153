"""Several LoRA adapters served beside the base model (`g3n serve --adapter NAME=DIR`): the request's
`model` picks one, rows of different adapters share the engine's steps, and each reply is what the
model with that adapter merged gives."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.adapters.merge import merge_lora
from g3n.cli import _serve_adapters
from g3n.errors import G3nError
from g3n.inference.backends import TorchEngine
from g3n.serve import Limits, create_app
from helpers import ServerThread, chat_body, request, tiny_with_saved_adapter


def _ask(server, model, question):
    """(reply text, its tokens' log-probabilities) of a greedy request."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 12, "logprobs": True}  # fmt: skip
    status, out = request(server, "POST", "/v1/chat/completions", body, timeout=120)
    assert status == 200, out
    choice = out["choices"][0]
    assert out["model"] == model
    return choice["message"]["content"], [round(t["logprob"], 3) for t in choice["logprobs"]["content"]]


def test_requests_pick_an_adapter_by_model_id(tiny, tmp_path):
    model, tok = tiny
    merged = {}
    for i, name in enumerate(("a", "b")):
        merged[name] = merge_lora(tiny_with_saved_adapter(tmp_path / name, seed=i + 1))
    engine = TorchEngine(copy.deepcopy(model), tok, "tiny", max_batch=4)
    for name in ("a", "b"):
        engine.add_adapter(name, tmp_path / name)
    with pytest.raises(G3nError, match="is taken"):
        engine.add_adapter("tiny", tmp_path / "a")
    questions = ["What is the capital of France?", "Hi"]
    expected = {}
    for name in ("a", "b"):
        with ServerThread(create_app(TorchEngine(merged[name], tok, "tiny", max_batch=1), Limits())) as alone:
            expected[name] = [_ask(alone, "tiny", q) for q in questions]
    with ServerThread(create_app(engine, Limits())) as server:
        status, listed = request(server, "GET", "/v1/models")
        assert [(m["id"], m.get("parent")) for m in listed["data"]] == [("tiny", None), ("a", "tiny"), ("b", "tiny")]
        assert request(server, "GET", "/v1/models/b")[1]["parent"] == "tiny"
        got = {name: [_ask(server, name, q) for q in questions] for name in ("a", "b")}
        assert got == expected
        assert got["a"] != got["b"]
        base = [_ask(server, "tiny", q) for q in questions]
        assert base != got["a"]
        status, out = request(server, "POST", "/v1/chat/completions", chat_body("Hi") | {"model": "c"})
        assert status == 404 and "'tiny', 'a', 'b'" in out["error"]["message"]


def test_serve_adapter_flags(tmp_path):
    (tmp_path / "x=y").mkdir()  # a directory whose name holds '=' is a directory, merged
    assert _serve_adapters(None) == (None, [])
    assert _serve_adapters(["runs/a/adapter"]) == ("runs/a/adapter", [])
    assert _serve_adapters(["support=runs/s/adapter", "chat=~/c"])[1][0] == ("support", "runs/s/adapter")
    assert _serve_adapters([str(tmp_path / "x=y")]) == (str(tmp_path / "x=y"), [])
    with pytest.raises(G3nError, match="takes one directory"):
        _serve_adapters(["a", "b"])
    with pytest.raises(G3nError, match="must differ"):
        _serve_adapters(["s=a", "s=b"])
