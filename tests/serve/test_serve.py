"""g3n serve over real HTTP on loopback (uvicorn in a thread, the tiny model on CPU): OpenAI's
shapes, the same text as g3n's own generation, 4xx JSON errors that leave the server serving,
concurrent streaming clients batched with independent results, disconnects freeing their slot,
the queue limit, the API key, and the official openai client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.inference.generate import stream_text
from g3n.inference.sampling import SamplingParams
from g3n.serve import Limits, create_app
from g3n.serve.content import parse_messages
from g3n.serve.errors import APIError
from g3n.serve.scheduler import StopStrings
from helpers import (
    QUESTION,
    WIDE,
    ServerThread,
    chat,
    chat_body,
    health,
    no_stop_tokens,
    open_stream,
    queued_chat,
    request,
    send_chat,
    stream_chunks,
    wait_idle,
)

MAX_BATCH = 8  # the engine's: 8 concurrent clients batch together
APP_OPTIONS = {"limits": Limits(max_body_bytes=2**20)}


def stream(server, content=QUESTION, **kw):
    """(text, finish_reason, usage or None, number of SSE events) of a streamed reply."""
    chunks = stream_chunks(server, "/v1/chat/completions", chat_body(content) | kw)
    text, finish, usage = [], None, None
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk", chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, usage, len(chunks)


def lone_text(engine, content, **params):
    """What g3n's own generation (the path of `g3n generate`) writes for this prompt."""
    ids = engine.encode_chat([{"role": "user", "content": content}])
    return "".join(stream_text(engine.model, engine.tok, ids, SamplingParams(**params)))


def test_models_health_and_page(server):
    status, models = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["modalities"] == ["text"]
    assert request(server, "GET", "/v1/models/tiny")[1]["id"] == "tiny"
    assert health(server)["status"] == "ok"
    status, page = request(server, "GET", "/")
    assert status == 200 and "<title>g3n chat</title>" in page


def test_completion_is_gemmas_reply(server, engine):
    status, out = chat(server, temperature=0)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": lone_text(engine, QUESTION, greedy=True)}
    assert "Paris" in choice["message"]["content"] and choice["finish_reason"] == "stop"
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(engine.encode_chat([{"role": "user", "content": QUESTION}]))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"]


def test_seed_gives_g3n_generates_text_streamed_or_not(server, engine):
    """Sampling with a seed: the same text streamed, not streamed, and from g3n's own generate
    path; other seeds give other texts (hot, unfiltered sampling: the tiny model is very sure)."""
    prompt, kw = "Tell me a fact.", {"temperature": 1.5, "top_p": 1.0, "top_k": 0, "max_tokens": 24}
    text, finish, usage, events = stream(server, prompt, seed=11, stream_options={"include_usage": True}, **kw)
    assert text == chat(server, prompt, seed=11, **kw)[1]["choices"][0]["message"]["content"]
    assert text == lone_text(engine, prompt, seed=11, temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=24)
    assert finish in ("stop", "length") and usage["completion_tokens"] > 0 and events > 3
    others = {chat(server, prompt, seed=s, **kw)[1]["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert len(others | {text}) > 1


def test_stop_strings_and_max_tokens(server):
    out = chat(server, temperature=0, stop=["Paris", "xyz"])[1]["choices"][0]
    assert out["message"]["content"] == "The capital of France is " and out["finish_reason"] == "stop"
    assert stream(server, temperature=0, stop="Paris")[:2] == ("The capital of France is ", "stop")
    out = chat(server, temperature=0, max_tokens=3)[1]
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3


def test_stop_strings_split_across_pieces():
    s = StopStrings(["END", "xy"])
    out = [s.push(p) for p in ["ab", "cE", "N", "Dzz"]]
    assert out == [("ab", False), ("c", False), ("", False), ("", True)]
    s = StopStrings(["END"])
    assert s.push("aEN") == ("a", False) and s.push("x") == ("ENx", False) and s.flush() == ""


def _png(size=(8, 6)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav(channels=2, rate=16000) -> str:
    import soundfile

    buf = io.BytesIO()
    t = np.linspace(0, 0.1, rate // 10, dtype=np.float32)
    soundfile.write(buf, np.stack([np.sin(2 * np.pi * 440 * t)] * channels, axis=1) * 0.5, rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def test_content_parts_become_hf_content_lists():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png()}},
            {"type": "input_audio", "input_audio": {"data": _wav(), "format": "wav"}},
            {"type": "text", "text": "What is this?"},
        ]},
    ]  # fmt: skip
    out, kinds = parse_messages(messages)
    assert kinds == {"text", "image", "audio"}
    assert out[0] == {"role": "system", "content": "Be brief."}  # strings stay strings: formatted as the CLI does
    image, audio, text = out[1]["content"]
    assert image["type"] == "image" and image["image"].size == (8, 6) and image["image"].mode == "RGB"
    assert audio["type"] == "audio" and audio["sampling_rate"] == 16000
    assert audio["audio"].dtype == np.float32 and audio["audio"].shape == (1600,)  # stereo -> mono
    assert text == {"type": "text", "text": "What is this?"}
    with pytest.raises(APIError, match=r"messages\[1\].content\[0\]: the image could not be decoded"):
        broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        parse_messages([messages[0], messages[1] | {"content": [broken]}])


BAD_REQUESTS = [  # (body, status, field the error names, code, words in the message)
    (b"{not json", 400, None, "invalid_json", "not valid JSON"),
    (b"[1, 2]", 400, None, "invalid_json", "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None, "'model' is required"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found", "gpt-4o"),
    (chat_body("hi") | {"temperature": -1}, 400, "temperature", None, "between"),
    (chat_body("hi") | {"temperature": "hot"}, 400, "temperature", None, "a number"),
    (chat_body("hi") | {"top_p": 0}, 400, "top_p", None, "greater than 0"),
    (chat_body("hi") | {"max_tokens": 0}, 400, "max_tokens", None, "between"),
    (chat_body("hi") | {"seed": 1.5}, 400, "seed", None, "an integer"),
    (chat_body("hi") | {"n": 2}, 400, "n", "unsupported", "not supported"),
    (chat_body("hi") | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "up to 4"),
    (chat_body("hi") | {"stream": "yes"}, 400, "stream", None, "true or false"),
    ({"model": "tiny", "messages": []}, 400, "messages", None, "non-empty"),
    ({"model": "tiny", "messages": [{"role": "function", "content": "x"}]}, 400, "messages", None, "role 'function'"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages", None, "messages[1]: the conversation must start with a user message"),
    (chat_body([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]), 400, "messages", None,
     "remote image URLs are not fetched"),
    (chat_body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]), 400, "messages", None,
     "messages[0].content[0]: the image data is not valid base64"),
    (chat_body([{"type": "text", "text": "hi"},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]),
     400, "messages", "unsupported_modality", "without an audio tower"),  # refused before decoding
    (chat_body([{"type": "image_url", "image_url": {"url": _png()}}, {"type": "text", "text": "hi"}]), 400, "messages",
     "unsupported_modality", "without a vision tower; images need a Gemma3nForConditionalGeneration checkpoint"),
    (chat_body([{"type": "input_audio", "input_audio": {"data": _wav(), "format": "wav"}}]), 400, "messages",
     "unsupported_modality", "without an audio tower"),
    (chat_body([{"type": "video", "video": "x"}]), 400, "messages", None, "expected a text, image_url or input_audio"),
    (chat_body("word " * 3000), 400, "messages", "context_length_exceeded", "at most 2047"),
    (json.dumps(chat_body("x" * (2**20 + 10))).encode(), 413, None, "request_too_large", "larger than"),
]  # fmt: skip


def test_bad_requests_get_json_4xx_and_the_server_keeps_serving(server):
    for body, status, param, code, words in BAD_REQUESTS:
        got, out = request(server, "POST", "/v1/chat/completions", body)
        assert got == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
        assert err["param"] == param and err["code"] == code, err
    assert request(server, "GET", "/v1/chat/completions")[0] == 405
    assert request(server, "GET", "/v1/nothing")[1]["error"]["code"] == "not_found"
    assert request(server, "GET", "/v1/models/gpt-4o")[0] == 404
    status, out = chat(server, temperature=0)
    assert status == 200 and "Paris" in out["choices"][0]["message"]["content"]
    stats = health(server)
    assert stats["waiting"] == 0 and stats["running"] == 0


def test_concurrent_streaming_clients_are_batched_and_independent(server):
    """8 clients stream at once, each with its own prompt and seed; each gets exactly the text it
    gets alone, and the server generated them in batches."""
    prompts = ["Tell me a fact.", "Hi", "What is 2+3?", "Name a planet.", "Who are you?",
               "What is the largest planet?", QUESTION, "Tell me a story."]  # fmt: skip
    n, tokens = len(prompts), 16
    results, errors = [None] * n, []
    start_gate = threading.Barrier(n)

    def client(i):
        try:
            start_gate.wait(timeout=30)
            t0 = time.perf_counter()
            text, finish, _, _ = stream(server, prompts[i], seed=100 + i, max_tokens=tokens)
            results[i] = (text, finish, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    together = time.perf_counter() - t0
    assert not errors and all(r is not None for r in results), errors
    assert together < 120
    t0 = time.perf_counter()
    alone = [stream(server, prompts[i], seed=100 + i, max_tokens=tokens)[0] for i in range(n)]
    one_by_one = time.perf_counter() - t0
    assert [r[0] for r in results] == alone
    assert len(set(alone)) > n // 2  # different prompts and seeds, different replies
    assert health(server)["largest_batch"] > 1
    print(f"\n{n} concurrent streams of {tokens} tokens: {together:.2f}s together, {one_by_one:.2f}s one by one; "
          f"slowest client {max(r[2] for r in results):.2f}s")  # fmt: skip


def test_client_disconnect_frees_the_slot(server):
    sock = open_stream(server)
    assert health(server)["running"] == 1
    t0 = time.perf_counter()
    sock.close()  # a 1500-token reply would take about a minute here
    wait_idle(server, 10)
    freed = time.perf_counter() - t0
    # a non-streamed request whose client leaves is noticed too (polled twice a second)
    with no_stop_tokens():
        sock = send_chat(server, chat_body("Tell me a story.") | {"max_tokens": 1500} | WIDE)
        deadline = time.monotonic() + 10
        while health(server)["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    sock.close()
    wait_idle(server, 10)
    assert chat(server, temperature=0)[0] == 200
    print(f"\nstreaming client gone -> slot free {freed:.2f}s later")


def test_queue_limit_gives_429_and_recovers(engine):
    with ServerThread(create_app(engine, Limits(max_queue=1, max_batch=1))) as server:
        running = open_stream(server)  # holds the only batch slot
        waiting = queued_chat(server, max_tokens=4)
        status, out = chat(server, "Hi")
        assert status == 429 and out["error"]["code"] == "queue_full" and out["error"]["type"] == "rate_limit_error"
        running.close()  # frees the slot: the waiting request runs, then the server takes new ones
        reply = waiting.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 200") or waiting.recv(65536)
        waiting.close()
        wait_idle(server, 10)
        assert chat(server, "Hi", max_tokens=4)[0] == 200


def test_api_key_on_every_route_but_health(engine):
    with ServerThread(create_app(engine, api_key="s3cret")) as server:
        for method, path in [("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
            status, out = request(server, method, path, chat_body("hi"))
            assert status == 401 and out["error"]["code"] == "invalid_api_key", (path, out)
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(server, "GET", "/health")[0] == 200
        assert request(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        basic = base64.b64encode(b"me:s3cret").decode()  # how a browser sends it after the 401's prompt
        assert request(server, "GET", "/", headers={"Authorization": f"Basic {basic}"})[0] == 200


def test_official_openai_client(server, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert out.choices[0].message.content == lone_text(engine, QUESTION, greedy=True)
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens > 0
    pieces = client.chat.completions.create(model="tiny", messages=messages, seed=4, stream=True, max_tokens=20)
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == lone_text(engine, QUESTION, seed=4, max_new_tokens=20)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=messages, temperature=5)


def test_adapter_is_merged_at_load(tmp_path, tiny):
    """--adapter: the served engine answers as the base model with the adapter does."""
    from g3n.inference.backends import load_engine
    from g3n.inference.generate import generate
    from helpers import tiny_with_saved_adapter

    adapted = tiny_with_saved_adapter(tmp_path / "adapter")
    engine = load_engine("tiny", dtype="float32", device="cpu", adapter=tmp_path / "adapter")
    base, tok = tiny
    layer = ("model", "layers", "0", "self_attn", "q_proj")
    assert not engine.model.get_submodule(".".join(layer)).weight.equal(base.get_submodule(".".join(layer)).weight)
    params = SamplingParams(greedy=True, max_new_tokens=40)
    for question in (QUESTION, "Tell me a fact."):
        ids = tok.encode_chat([{"role": "user", "content": question}])
        expected = tok.decode(generate(adapted, [ids], params, tok.stop_ids)[0])
        assert "".join(engine.stream(ids, params)) == expected


def test_g3n_serve_command(tmp_path):
    """`g3n serve` as users start it (a subprocess): it checks the key and Ctrl-C stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import g3n

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(g3n.__file__).parent.parent)}
    cmd = [sys.executable, "-m", "g3n", "serve", "--port", str(port), "--device", "cpu", "--api-key", "k3y",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server = type("S", (), {"port": port})
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if request(server, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        body = chat_body(QUESTION) | {"temperature": 0, "max_tokens": 40}
        assert request(server, "POST", "/v1/chat/completions", body)[0] == 401
        status, out = request(server, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer k3y"})
        assert status == 200 and "Paris" in out["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert f"serving tiny on http://127.0.0.1:{port}" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_late_short_request_finishes_before_an_early_long_one(server):
    """Continuous batching: a request that arrives while a long reply streams joins it at the next
    step and finishes first (static batching made it wait for the whole long reply)."""
    sock = open_stream(server)
    try:
        started = time.perf_counter()
        status, body = chat(server, "Hi", max_tokens=3)
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        assert health(server)["running"] == 1  # the long reply is still going
        assert time.perf_counter() - started < 30
    finally:
        sock.close()
    wait_idle(server, 10)


def test_static_batching_makes_a_late_request_wait_for_the_batch(engine):
    """`--batching static` (the comparison for continuous batching): a request that arrives while
    a batch runs waits in the queue until that batch ends, then runs."""
    with ServerThread(create_app(engine, Limits(batching="static"))) as static:
        sock = open_stream(static)
        try:
            done = {}
            late = threading.Thread(target=lambda: done.update(out=chat(static, "Hi", max_tokens=3)))
            late.start()
            deadline = time.monotonic() + 10
            while health(static)["waiting"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert health(static)["waiting"] == 1 and health(static)["running"] == 1
            time.sleep(0.5)
            assert "out" not in done  # still queued behind the running batch
        finally:
            sock.close()  # the batch ends (its client left): the late request runs
        late.join(timeout=30)
        assert done["out"][0] == 200
