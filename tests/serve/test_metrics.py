"""GET /metrics on the tiny model: Prometheus' text format whose counters add up to what the
server answered (responses by status, the usage it reported, one time-to-first-token per reply),
gauges that see a running request, and the API key rule."""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.serve import create_app
from helpers import ServerThread, chat, open_stream, request, wait_idle

LINE = re.compile(r'^([a-z_][a-z0-9_]*)(?:\{((?:[a-z_]+="[^"]*",?)*)\})? (\S+)$')


def scrape(server, headers=None) -> dict[tuple[str, tuple], float]:
    """{(name, ((label, value), ...)): value}, every line checked against the text format."""
    status, text = request(server, "GET", "/metrics", headers=headers)
    assert status == 200, text
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = LINE.match(line)
        assert m, line
        name, labels, value = m.groups()
        assert name in typed or re.sub(r"_(bucket|sum|count)$", "", name) in typed, line
        out[name, tuple(re.findall(r'([a-z_]+)="([^"]*)"', labels or ""))] = float(value)
    return out


def responses(metrics, route, status) -> float:
    return sum(v for (name, labels), v in metrics.items()
               if name == "g3n_requests_total" and ("route", route) in labels and ("status", str(status)) in labels)  # fmt: skip


def test_metrics_add_up_to_what_the_server_answered(engine):
    with ServerThread(create_app(engine)) as server:
        usage = [chat(server, max_tokens=5, seed=i)[1]["usage"] for i in range(3)]
        status, out = request(server, "POST", "/v1/completions",
                              {"model": "tiny", "prompt": ["Hello", "Hi"], "max_tokens": 4, "seed": 1})  # fmt: skip
        assert status == 200
        usage.append(out["usage"])
        assert chat(server, temperature=9)[0] == 400
        assert request(server, "GET", "/v1/nothing")[0] == 404
        m = scrape(server)
        assert responses(m, "/v1/chat/completions", 200) == 3 and responses(m, "/v1/chat/completions", 400) == 1
        assert responses(m, "/v1/completions", 200) == 1 and responses(m, "other", 404) == 1
        assert m["g3n_prompt_tokens_total", ()] == sum(u["prompt_tokens"] for u in usage)
        generated = sum(u["completion_tokens"] for u in usage)
        assert m["g3n_completion_tokens_total", ()] == generated
        replies = 5  # 3 chats and 2 prompts, each with at least one token
        assert m["g3n_time_to_first_token_seconds_count", ()] == replies
        assert m["g3n_time_per_output_token_seconds_count", ()] == generated - replies
        for hist in ("g3n_time_to_first_token_seconds", "g3n_time_per_output_token_seconds"):
            buckets = [v for (name, labels), v in m.items() if name == hist + "_bucket"]
            assert buckets == sorted(buckets) and buckets[-1] == m[hist + "_count", ()]  # cumulative, +Inf last
            assert m[hist + "_sum", ()] > 0
        assert m["g3n_requests_running", ()] == 0 and m["g3n_requests_waiting", ()] == 0
        sock = open_stream(server)  # a long reply is running
        try:
            assert scrape(server)["g3n_requests_running", ()] == 1
        finally:
            sock.close()
        wait_idle(server)
        time.sleep(0.1)
        assert responses(scrape(server), "/metrics", 200) >= 2


def test_metrics_need_the_key_when_there_is_one(engine):
    with ServerThread(create_app(engine, api_key="k3y")) as server:
        status, out = request(server, "GET", "/metrics")
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        m = scrape(server, {"Authorization": "Bearer k3y"})
        assert responses(m, "/metrics", 401) == 1
        assert request(server, "GET", "/health")[0] == 200
