"""g3n serve is lenient where OpenAI is (the tiny model on CPU): messages of one role in a row and
several system messages are merged as documented, errors name the right message, integral floats
count as integers, browser apps on --cors-origin origins get CORS, and a 429 says when to retry."""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.errors import G3nError
from g3n.serve import Limits, create_app
from g3n.serve.schema import merge_turns
from helpers import ServerThread, chat, health, open_stream, queued_chat, request, wait_idle


def reply(server, messages, **kw):
    status, out = request(server, "POST", "/v1/chat/completions",
                          {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12, **kw})  # fmt: skip
    assert status == 200, out
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"]


def _says(role):
    return lambda text: {"role": role, "content": text}


def test_turns_of_one_role_and_system_messages_merge(server):
    """Two user messages in a row read as one with a blank line between; system messages anywhere
    join, in order, into the one system prompt; assistant messages in a row merge too."""
    u, s, a = _says("user"), _says("system"), _says("assistant")
    assert reply(server, [u("Hello."), u("What is the capital of France?")]) == reply(
        server, [u("Hello.\n\nWhat is the capital of France?")]
    )
    merged = reply(server, [s("Be brief."), s("Answer in English."), u("Hi"), a("Hello!"), a("How can I help?"),
                            u("Name a planet.")])  # fmt: skip
    assert merged == reply(server, [s("Be brief."), u("Hi"), {"role": "developer", "content": "Answer in English."},
                                    a("Hello!\n\nHow can I help?"), u("Name a planet.")])  # fmt: skip
    assert merged == reply(server, [s("Be brief.\n\nAnswer in English."), u("Hi"), a("Hello!\n\nHow can I help?"),
                                    u("Name a planet.")])  # fmt: skip
    alone = reply(server, [s("What is the capital of France?")])  # a system prompt alone is the user's turn
    assert alone == reply(server, [u("What is the capital of France?")])


def test_merge_turns_keeps_parts():
    image = {"type": "image", "image": "IMG"}
    turns = merge_turns([
        {"role": "user", "content": [image, {"type": "text", "text": "What is this? "}]},
        {"role": "user", "content": " And this?"},
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    ])  # fmt: skip
    assert turns == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [image, {"type": "text", "text": "What is this?\n\nAnd this?"}]},
    ]


def test_errors_name_the_message_they_are_about(server):
    for messages, where in [
        ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}], "messages[0]"),
        ([{"role": "system", "content": "x"}, {"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}],
         "messages[2]"),
        ([{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}], "messages[1]"),
    ]:  # fmt: skip
        status, out = request(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages})
        assert status == 400 and out["error"]["message"].startswith(where + ":"), out
        assert out["error"]["param"] == "messages"
    status, out = chat(server, max_tokens=6.5)
    assert status == 400 and out["error"]["param"] == "max_tokens"


def test_integral_floats_count_as_integers(server):
    status, out = chat(server, max_tokens=6.0, seed=3.0, top_k=40.0, top_logprobs=2.0, logprobs=True)
    assert status == 200 and out["usage"]["completion_tokens"] <= 6, out
    assert len(out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert out["choices"][0]["message"] == chat(server, max_tokens=6, seed=3, top_k=40)[1]["choices"][0]["message"]


def _preflight(port: int, origin: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_cors_only_for_the_given_origins(engine, server):
    app = create_app(engine, api_key="k3y", cors_origins=["https://app.example", "http://localhost:3000"])
    with ServerThread(app) as cors:
        resp = _preflight(cors.port, "https://app.example")  # no key: browsers send none on a preflight
        assert resp.status == 200 and resp.getheader("access-control-allow-origin") == "https://app.example"
        assert "POST" in resp.getheader("access-control-allow-methods")
        assert "authorization" in resp.getheader("access-control-allow-headers").lower()
        resp = _preflight(cors.port, "https://evil.example")
        assert resp.status >= 400 and resp.getheader("access-control-allow-origin") is None
        conn = http.client.HTTPConnection("127.0.0.1", cors.port, timeout=60)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        headers = {"Content-Type": "application/json", "Origin": "http://localhost:3000"}
        for key, status in ((None, 401), ("k3y", 200)):
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            conn.request("POST", "/v1/chat/completions", body, headers | auth)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == status and resp.getheader("access-control-allow-origin") == "http://localhost:3000"
        conn.close()
    resp = _preflight(server.port, "https://app.example")  # the default: no CORS at all
    assert resp.status == 405 and resp.getheader("access-control-allow-origin") is None
    with pytest.raises(G3nError, match="invalid CORS origin"):
        create_app(engine, cors_origins=["app.example"])


def test_429_says_when_to_retry(engine):
    with ServerThread(create_app(engine, Limits(max_queue=1, max_batch=1))) as server:
        running = open_stream(server)  # holds the only batch slot
        waiting = queued_chat(server, max_tokens=2)
        for path, extra in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                            ("/v1/completions", {"prompt": "a"})):  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("POST", path, json.dumps({"model": "tiny", **extra}), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read())
            assert resp.status == 429 and out["error"]["code"] == "queue_full", out
            assert int(resp.getheader("retry-after")) >= 1
            conn.close()
        running.close()
        waiting.close()
        wait_idle(server, 10)
        assert health(server)["waiting"] == 0
