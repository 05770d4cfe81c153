"""Serving under load: `g3n serve` as users start it (and, when given, llama.cpp's `llama-server`
on the same model as an f16 GGUF), driven by streaming OpenAI chat clients.

Load: `--clients` requests (default 32), each a prompt of about `--prompt` tokens (512) and a reply
of `--new` tokens (256), arriving at seeded random times over `--arrive-s` seconds (2), with
Google's sampling (temperature 1, top_k 64, top_p 0.95). Reported per server: aggregate tokens/s
(every reply's tokens over the time from the first request to the last token), and p50/p95 of
the time to first token and of the time per token after it (per request).

    PYTHONPATH=src python bench/serve_gpu.py --model DIR [--batching continuous static]
        [--llama-server BIN --gguf FILE] [--clients 32 --prompt 512 --new 256 --arrive-s 2]

`--model`: what `g3n serve --model` takes (a checkpoint directory, an HF id in the local cache,
`tiny`); bench/make_synthetic_checkpoint.py writes random weights at real sizes (give it a
tokenizer). `--batching static` starts the server with `--batching static` (a
batch runs to its end before the next is admitted), the comparison for continuous batching.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from g3n.checkpoint.names import resolve_model_dir
from g3n.tokenizer import Tokenizer

WORDS = [
    "the",
    "river",
    "city",
    "morning",
    "light",
    "story",
    "under",
    "over",
    "quiet",
    "bright",
    "stone",
    "garden",
    "music",
    "window",
    "travel",
]


def prompt_text(tokenizer, tokens: int, rng: random.Random) -> str:
    """Random words, cut where the text reaches about `tokens` tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words += [rng.choice(WORDS) for _ in range(16)]
    while len(tokenizer.encode(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer from {url} in {timeout:.0f}s")


def one_request(port: int, model: str, text: str, new: int, delay: float, result: dict) -> None:
    """A streaming chat request sent `delay` seconds from now: its send time, token arrival times, tokens."""
    time.sleep(delay)
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": new, "stream": True,
            "temperature": 1.0, "top_p": 0.95, "top_k": 64, "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent, stamps, tokens = time.perf_counter(), [], None
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        result["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
        return
    while line := resp.readline():
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            stamps.append(time.perf_counter())
    conn.close()
    result.update(sent=sent, first=stamps[0], last=stamps[-1], tokens=tokens or len(stamps))


def load(port: int, model: str, texts: list[str], new: int, delays: list[float]) -> dict:
    """Every request on its own thread; the aggregate and per-request latencies."""
    results = [{} for _ in texts]
    threads = [threading.Thread(target=one_request, args=(port, model, t, new, d, r))
               for t, d, r in zip(texts, delays, results, strict=True)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, the first: {failed[0]}")
    ttft = [r["first"] - r["sent"] for r in results]
    per_token = [(r["last"] - r["first"]) / max(1, r["tokens"] - 1) for r in results]
    span = max(r["last"] for r in results) - min(r["sent"] for r in results)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]

    return {"tok_s": round(sum(r["tokens"] for r in results) / span, 1),
            "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p95_s": round(pct(ttft, 95), 3),
            "tpot_p50_ms": round(pct(per_token, 50) * 1e3, 1), "tpot_p95_ms": round(pct(per_token, 95) * 1e3, 1),
            "tokens": sum(r["tokens"] for r in results)}  # fmt: skip


def serve(cmd: list[str], port: int, name: str, texts, new, delays, warm: list[str]) -> dict:
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        print(f"[{name}] ready after {wait_ready(f'http://127.0.0.1:{port}', proc):.1f}s", flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            name = json.load(r)["data"][0]["id"]  # the model id requests name
        # warm-up on other prompts: every batch size the load reaches gets its compiled step once
        load(port, name, warm, 16, [0.0] * len(warm))
        return load(port, name, texts, new, delays)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batching", nargs="+", default=["continuous"], choices=["continuous", "static"])
    ap.add_argument("--llama-server", help="llama-server binary (built with CUDA)")
    ap.add_argument("--gguf", help="the f16 GGUF for llama-server (g3n export --format gguf)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--arrive-s", type=float, default=2.0)
    args = ap.parse_args()
    rng = random.Random(0)
    tokenizer = Tokenizer.from_dir(resolve_model_dir(args.model))
    texts = [prompt_text(tokenizer, args.prompt, rng) for _ in range(2 * args.clients)]
    texts, warm = texts[: args.clients], texts[args.clients :]
    delays = sorted(rng.uniform(0, args.arrive_s) for _ in range(args.clients))
    rows = {}
    for batching in args.batching:
        port = free_port()
        cmd = [sys.executable, "-m", "g3n", "serve", "--model", args.model, "--port", str(port),
               "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients)]  # fmt: skip
        if batching == "static":
            cmd += ["--batching", "static"]
        rows[f"g3n serve ({batching})"] = serve(cmd, port, "g3n", texts, args.new, delays, warm)
    if args.llama_server:
        port = free_port()
        cmd = [args.llama_server, "-m", args.gguf, "--port", str(port), "-np", str(args.clients),
               "-c", str(args.clients * (args.prompt + args.new + 64)), "-ngl", "999", "--no-webui"]  # fmt: skip
        rows["llama-server"] = serve(cmd, port, "llama", texts, args.new, delays, warm)
    for name, r in rows.items():
        print(f"{name:28s} {r}", flush=True)


if __name__ == "__main__":
    main()
