"""g3n serve against hostile and careless clients (the tiny model on CPU): cross-site requests,
empty keys, stop strings, media bombs, half-open connections and trickled bodies, bad server flags,
tiny temperatures, and request shapes that used to give a 500."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.errors import G3nError
from g3n.inference.sampling import SamplingParams
from g3n.serve import Limits, create_app, server_config
from g3n.serve.content import parse_messages
from g3n.serve.errors import APIError
from g3n.serve.scheduler import StopStrings
from g3n.serve.server import HeaderTimeoutH11, RateLimit
from helpers import ServerThread, chat, chat_body, request

APP_OPTIONS = {"allowed_hosts": ["g3n.example"]}


def raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send bytes on a new connection; what comes back until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def post(port: int, body: dict, headers: str) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\n{headers}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    reply = raw(port, head.encode() + data)
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.partition(b"\r\n\r\n")[2] or b"{}")


# ---- item 2: cross-site requests --------------------------------------------------------------


def test_posts_need_json_and_a_host_naming_this_server(server):
    body = chat_body("hi") | {"max_tokens": 2}
    local = "Host: 127.0.0.1\r\n"
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, out = post(server.port, body, local + (f"Content-Type: {kind}\r\n" if kind else ""))
        assert status == 415 and out["error"]["code"] == "unsupported_media_type", (kind, out)
    assert post(server.port, body, local + "Content-Type: Application/JSON; charset=utf-8\r\n")[0] == 200
    json_type = "Content-Type: application/json\r\n"
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example"):
        status, out = post(server.port, body, f"Host: {host}\r\n{json_type}")
        assert status == 421 and out["error"]["code"] == "invalid_host" and "--allowed-host" in out["error"]["message"]
        reply = raw(server.port, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 421"), reply[:100]
    for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost:8000", "LOCALHOST.", "[::1]:8000",
                 "10.1.2.3", "g3n.example", "G3N.example:443"):  # fmt: skip
        assert post(server.port, body, f"Host: {host}\r\n{json_type}")[0] == 200, host
    # no CORS: a browser's preflight gets no Access-Control-Allow-Origin, so it never sends the POST
    preflight = raw(server.port, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example"
                    b"\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert b"access-control-allow" not in preflight.lower()


def test_any_host_when_allowed(engine):
    with ServerThread(create_app(engine, allowed_hosts=["*"])) as s:
        headers = "Host: anything.example\r\nContent-Type: application/json\r\n"
        assert post(s.port, chat_body("hi") | {"max_tokens": 1}, headers)[0] == 200


# ---- item 3: empty API keys ---------------------------------------------------------------------


def test_an_empty_api_key_is_refused(engine, monkeypatch, capsys):
    from g3n.cli import build_parser, main

    for key in ("", " ", " k3y"):
        with pytest.raises(G3nError, match="API key is empty"):
            create_app(engine, api_key=key)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--api-key", key])
    for key in ("", "k3y\n"):
        monkeypatch.setenv("G3N_API_KEY", key)
        assert main(["serve", "--device", "cpu"]) == 2
        assert "$G3N_API_KEY is empty or starts or ends with whitespace" in capsys.readouterr().err


# ---- item 4: stop strings -----------------------------------------------------------------------


def test_long_stop_strings_are_refused_at_once(server):
    for stop in (["x" * 300000] * 4, "x" * 201):
        t0 = time.perf_counter()
        status, out = chat(server, stop=stop, max_tokens=8)
        assert status == 400 and out["error"]["param"] == "stop" and "at most 200 characters" in out["error"]["message"]
        assert time.perf_counter() - t0 < 5
    assert chat(server, stop=["y" * 200] * 4, max_tokens=8, temperature=0)[0] == 200


def test_stop_strings_are_matched_in_linear_time():
    """The longest stop strings and a reply that keeps almost matching them: each piece costs
    the same, however long the reply (the old matching re-checked every prefix every time)."""
    stops = ["x" * 5000 + str(i) for i in range(4)]
    s = StopStrings(stops)
    t0 = time.perf_counter()
    sent = "".join(s.push("x")[0] for _ in range(20000))
    assert time.perf_counter() - t0 < 5
    assert sent == "x" * 15000 and s.push("2") == ("", True)


def _reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Where a stop string first ends, cut before the longest one ending there."""
    for end in range(1, len(text) + 1):
        found = [s for s in stops if text[:end].endswith(s)]
        if found:
            return text[: end - max(map(len, found))], True
    return text, False


def test_stop_strings_cut_the_same_however_the_text_is_split():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        s, out, hit = StopStrings(stops), [], False
        for piece in pieces:
            sent, hit = s.push(piece)
            out.append(sent)
            if hit:
                break
        if not hit:
            out.append(s.flush())
        assert ("".join(out), hit) == _reference(stops, text), (stops, pieces)


# ---- item 5: media ------------------------------------------------------------------------------


def _bomb_png(size=13000) -> bytes:
    """A PNG of a few KB that decodes to size x size pixels (1 bit each in the file)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (size, size)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _flac(seconds: float, channels: int, rate: int = 16000) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((int(rate * seconds), channels), np.float32), rate, format="FLAC")
    return buf.getvalue()


def forbid_decoding(monkeypatch):
    """From now on, fail the test if any image or audio is decoded."""
    import soundfile
    from PIL import Image

    def refuse(*args, **kwargs):
        raise AssertionError("media was decoded")

    for owner, name in ((Image.Image, "load"), (Image.Image, "convert"), (soundfile, "read"),
                        (soundfile.SoundFile, "read")):  # fmt: skip
        monkeypatch.setattr(owner, name, refuse)


def test_media_for_a_text_only_model_is_refused_before_decoding(server, monkeypatch):
    png = "data:image/png;base64," + base64.b64encode(_bomb_png(64)).decode()
    wav = base64.b64encode(_flac(0.5, 1)).decode()
    forbid_decoding(monkeypatch)
    for part in ({"type": "image_url", "image_url": {"url": png}},
                 {"type": "input_audio", "input_audio": {"data": wav, "format": "flac"}}):  # fmt: skip
        status, out = request(server, "POST", "/v1/chat/completions", chat_body([part, {"type": "text", "text": "hi"}]))
        assert status == 400 and out["error"]["code"] == "unsupported_modality", out


@pytest.mark.filterwarnings("ignore:Image size")  # Pillow's own warning, from the header, before ours
def test_image_and_audio_bombs_are_refused_from_their_headers(monkeypatch):
    bomb, long = _bomb_png(), _flac(600, 8)  # 10 minutes of 8-channel silence: 1.2 GB as float32
    assert len(bomb) < 100_000 and len(long) < 300_000
    forbid_decoding(monkeypatch)
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bomb).decode()}}
    with pytest.raises(APIError, match=r"messages\[0\].content\[0\]: the image is 13000x13000 pixels"):
        parse_messages([{"role": "user", "content": [part]}])
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(long).decode(), "format": "flac"}}
    with pytest.raises(APIError, match=r"messages\[0\].content\[0\]: 600.0 s of audio; .* at most 30 s"):
        parse_messages([{"role": "user", "content": [part]}])


def test_a_requests_images_share_one_pixel_budget():
    from g3n.serve.content import MAX_REQUEST_PIXELS

    side = int((MAX_REQUEST_PIXELS * 0.6) ** 0.5)
    url = "data:image/png;base64," + base64.b64encode(_bomb_png(side)).decode()
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(APIError, match=r"content\[1\]: .* at most 50000000 pixels in all \(of which"):
        parse_messages([{"role": "user", "content": [part, part]}])


def test_audio_errors_name_the_part_not_a_python_object():
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(APIError) as e:
        parse_messages([{"role": "user", "content": [part]}])
    assert "messages[0].content[0]: the audio could not be decoded" in e.value.message
    assert "BytesIO" not in e.value.message and "0x" not in e.value.message


class _MediaEngine:
    """Takes images; `prepare` counts how many requests hold decoded media at once."""

    name, modalities, context_length, max_batch, model_dir = "fake", {"text", "image"}, 4096, 1, None

    def __init__(self):
        self.now = self.most = 0
        self.lock = threading.Lock()

    def prepare(self, messages):
        assert messages[0]["content"][0]["image"].size == (16, 16)
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.3)
        with self.lock:
            self.now -= 1
        return [1, 2, 3], None

    def submit(self, *args):
        raise G3nError("prepared")


def test_requests_decode_media_a_few_at_a_time():
    engine = _MediaEngine()
    url = "data:image/png;base64," + base64.b64encode(_bomb_png(16)).decode()
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    with ServerThread(create_app(engine, Limits(media_decoders=2))) as s:
        threads = [threading.Thread(target=request, args=(s, "POST", "/v1/chat/completions", body)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert request(s, "POST", "/v1/chat/completions", body)[1]["error"]["message"] == "prepared"
    assert engine.most == 2


# ---- item 6: connections ------------------------------------------------------------------------


def test_uvicorn_gets_limits():
    config = server_config(object(), "127.0.0.1", 8000, Limits(max_connections=7, header_timeout=3))
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 5
    assert config.h11_max_incomplete_event_size == 16 * 2**10 and config.timeout_graceful_shutdown == 5
    assert issubclass(config.http, HeaderTimeoutH11) and config.http.header_timeout == 3


def _health(port: int) -> bytes:
    return raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=10)


def test_half_open_connections_are_closed_and_the_server_degrades_with_503(engine):
    limits = Limits(max_connections=4, header_timeout=1.0, body_timeout=1.0)
    with ServerThread(create_app(engine, limits), limits) as served:
        half = [socket.create_connection(("127.0.0.1", served.port), timeout=10) for _ in range(4)]
        for sock in half:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        time.sleep(0.2)
        assert _health(served.port).startswith(b"HTTP/1.1 503")
        t0 = time.monotonic()
        for sock in half:  # closed by the server once the header timeout passes
            assert sock.recv(100) == b""
            sock.close()
        assert time.monotonic() - t0 < 5
        assert _health(served.port).startswith(b"HTTP/1.1 200")
        # headers sent, body trickled: 408 once the body timeout passes
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"mod")  # fmt: skip
            assert sock.recv(1000).startswith(b"HTTP/1.1 408")
        assert _health(served.port).startswith(b"HTTP/1.1 200")


def test_repeated_log_lines_are_bounded():
    import logging

    limit = RateLimit(burst=3, window=0.2)
    records = [logging.LogRecord("asyncio", logging.ERROR, "x", 1, f"accept failed\nsocket {i}", None, None)
               for i in range(100)]  # fmt: skip
    assert sum(limit.filter(r) for r in records) == 3
    time.sleep(0.25)
    late = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "accept failed", None, None)
    assert limit.filter(late) and "97 similar messages dropped" in late.getMessage()


# ---- item 7: server flags -----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--max-queue", "0"], ["--max-body-mb", "-1"], ["--max-body-mb", "nan"],
                                   ["--max-body-mb", "inf"], ["--max-body-mb", "0"], ["--max-connections", "0"],
                                   ["--host", ""], ["--allowed-host", ""]])  # fmt: skip
def test_bad_server_flags_are_usage_errors(flags, capsys):
    from g3n.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", *flags])
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_bad_limits_are_refused():
    for bad in ({"max_queue": 0}, {"max_body_bytes": -1}, {"body_timeout": float("nan")}, {"max_batch": True},
                {"header_timeout": float("inf")}, {"max_prompt_tokens": 0}):  # fmt: skip
        with pytest.raises(G3nError, match=next(iter(bad))):
            Limits(**bad)


# ---- item 14: tiny temperatures -----------------------------------------------------------------


def test_tiny_temperatures_are_greedy(server):
    for t in (1e-300, 1e-39, 1e-6):
        p = SamplingParams(temperature=t)
        assert p.greedy and p.temperature == 0.0
    assert not SamplingParams(temperature=1e-4).greedy
    greedy = chat(server, temperature=0, max_tokens=12)[1]["choices"][0]["message"]["content"]
    for seed in (1, 2):
        status, out = chat(server, temperature=1e-300, seed=seed, max_tokens=12)
        assert status == 200 and out["choices"][0]["message"]["content"] == greedy


# ---- one-line errors, not 500s ------------------------------------------------------------------


def test_odd_request_shapes_get_400(server):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, out = request(server, "POST", "/v1/chat/completions", deep)
    assert status == 400 and out["error"]["code"] == "invalid_json" and "nested too deeply" in out["error"]["message"]
    for role in ([], {}, 5, None, ["user"]):
        body = {"model": "tiny", "messages": [{"role": role, "content": "hi"}]}
        status, out = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and "messages[0]: role" in out["error"]["message"], (role, out)
    nested = [[[[1]]]]
    for body in (chat_body([{"type": "text", "text": 5}]), chat_body([{"type": nested}]),
                 chat_body("hi") | {"temperature": nested},
                 chat_body([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": nested}}])):  # fmt: skip
        status, out = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and out["error"]["param"] in ("messages", "temperature"), (body, out)
