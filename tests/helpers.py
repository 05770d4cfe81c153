"""Tiny random Gemma 3n checkpoints written by transformers, the numerical reference."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# A 768-piece Gemma-style tokenizer and llama.cpp-shaped decoder config for random test models, independent of "tiny"
TOKENIZER768 = Path(__file__).parent / "assets" / "tiny768"


def hf_text_config(**overrides):
    from transformers import Gemma3nTextConfig

    kw = {
        "vocab_size": 300,
        "vocab_size_per_layer_input": 256,
        "hidden_size": 32,
        "hidden_size_per_layer_input": 8,
        "intermediate_size": [64, 48, 64, 32, 64, 64, 48, 64, 64, 64],
        "num_hidden_layers": 10,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 8,
        "num_kv_shared_layers": 5,
        "laurel_rank": 4,
        "altup_num_inputs": 4,
        "activation_sparsity_pattern": [0.95, 0.95, 0.9, 0.0, 0.0, 0.95, 0.0, 0.0, 0.0, 0.0],
        "max_position_embeddings": 256,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        },
    }
    kw.update(overrides)
    return Gemma3nTextConfig(**kw)


def randomize_(model, seed=0, scale=0.4):
    """Random weights everywhere (transformers inits norms to 1 and some scales to 0).

    `scale` sets matrix weights to scale / sqrt(fan_in): deep models need less to stay tame.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "correct_output_scale" in name:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
    return model


def make_hf_model(seed=0, scale=0.4, **overrides):
    from transformers import Gemma3nForCausalLM

    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(hf_text_config(**overrides)).float().eval()
    return randomize_(model, seed, scale)


def tiny_with_saved_adapter(adapter_dir, seed=0):
    """The tiny model with a LoRA adapter whose B weights are random (so it changes the logits),
    saved in PEFT's format to `adapter_dir`; returns the adapted model (float32, CPU)."""
    import g3n
    from g3n.adapters.lora import add_lora, save_adapter

    model, _ = g3n.load("tiny", dtype="float32", device="cpu")
    torch.manual_seed(seed)  # PEFT draws the A matrices from the global generator
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    save_adapter(model, adapter_dir, base_model="tiny")
    return model.eval()


def widen_first_lora_a(adapter):
    """Give the adapter's first lora_A one more input column: an adapter of another model's shapes."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = min(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.cat([tensors[key], tensors[key][:, :1]], dim=1)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return key


# ---- multimodal -------------------------------------------------------------------------------
# A tiny Gemma3nForConditionalGeneration: TOKENIZER768's 768 pieces, then 8 vision and 8
# audio ids (as the real model puts them past its 262144 pieces); a MobileNetV5 with small widths
# (timm hard-codes its 2048 output features) giving 2 x 2 = 4 soft tokens per 64 x 64 image; a
# 2-layer conformer. Image/audio marker ids mirror the real layout (eoi = vision offset, image
# soft token = offset + 1, ...); boi/boa reuse two <unused> pieces.
MM_IDS = {"boi": 10, "eoi": 768, "image": 769, "boa": 11, "eoa": 776, "audio": 777}
VISION_ARCH = [
    ["er_r1_k3_s2_e4_c8"],
    ["uir_r1_a3_k5_s2_e2_c16"],
    ["uir_r1_a3_k3_s2_e2_c16", "mqa_r1_k3_h2_v2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"],
    ["uir_r1_a3_k3_s2_e2_c24", "mqa_r1_k3_h2_s1_d8_c24", "uir_r1_a0_k0_s1_e2_c24"],
]


def hf_multimodal_config(audio_tokens=8, image_tokens=4, text=None):
    """`image_tokens` soft tokens per image (a square number: the MSFA's output side squared);
    `text`: the decoder's Gemma3nTextConfig (default: the small hf_text_config one)."""
    import json

    from timm.models._efficientnet_builder import decode_arch_def
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nVisionConfig

    block_args = json.loads(json.dumps(decode_arch_def(VISION_ARCH)))
    side = round(image_tokens**0.5)
    vision = Gemma3nVisionConfig(
        model_args={"block_args": block_args, "stem_size": 8, "msfa_output_resolution": side},
        vocab_offset=768,
        vocab_size=8,
    )
    audio = Gemma3nAudioConfig(
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=2,
        sscp_conv_channel_size=[8, 8],
        vocab_offset=776,
        vocab_size=8,
    )
    if text is None:
        text = hf_text_config(vocab_size=784, vocab_size_per_layer_input=768, max_position_embeddings=512)
    return Gemma3nConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        audio_config=audio.to_dict(),
        vision_soft_tokens_per_image=image_tokens,
        audio_soft_tokens_per_image=audio_tokens,
        boi_token_id=MM_IDS["boi"],
        eoi_token_id=MM_IDS["eoi"],
        image_token_id=MM_IDS["image"],
        boa_token_id=MM_IDS["boa"],
        eoa_token_id=MM_IDS["eoa"],
        audio_token_id=MM_IDS["audio"],
    )


def llama_cpp_text_config(**overrides):
    """TOKENIZER768's decoder config (inside what llama.cpp's Gemma 3n graph hard-codes) with the
    multimodal vocabulary: 768 pieces, then 8 vision and 8 audio ids."""
    import json

    from transformers import Gemma3nTextConfig

    raw = json.loads((TOKENIZER768 / "config.json").read_text())
    raw.update({"vocab_size": 784, "vocab_size_per_layer_input": 768, **overrides})
    return Gemma3nTextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})


def make_hf_multimodal(seed=0, scale=0.4, **config):
    """transformers' tiny multimodal model, random weights everywhere, float32 (`config`: for
    hf_multimodal_config)."""
    import copy

    from transformers import Gemma3nForConditionalGeneration

    cfg = hf_multimodal_config(**config)
    clean_args = copy.deepcopy(cfg.vision_config.model_args)
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(cfg).float().eval()
    model.config.vision_config.model_args = clean_args  # timm mutates it in place
    return randomize_(model, seed, scale)


def save_hf_multimodal(model, out_dir, image_size=64):
    """The model plus TOKENIZER768 (with the media tokens added) as a checkpoint directory; its
    image processor resizes to `image_size` squared."""
    import json
    import shutil

    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.model", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(TOKENIZER768 / name, out_dir / name)
    tok_cfg = json.loads((TOKENIZER768 / "tokenizer_config.json").read_text())
    names = {
        "eoi": "<end_of_image>",
        "image": "<image_soft_token>",
        "eoa": "<end_of_audio>",
        "audio": "<audio_soft_token>",
    }
    for key, content in names.items():
        tok_cfg["added_tokens_decoder"][str(MM_IDS[key])] = {"content": content, "special": True}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    # One preprocessor_config.json for both processors, as Google ships it (64 x 64 images by default).
    from transformers import Gemma3nAudioFeatureExtractor, SiglipImageProcessor

    size = {"height": image_size, "width": image_size}
    images = SiglipImageProcessor(size=size, do_normalize=False, resample=2)
    merged = {**json.loads(Gemma3nAudioFeatureExtractor().to_json_string()), **json.loads(images.to_json_string())}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(merged, indent=1))
    return out_dir


CAPITALS = ["Zork", "Blip", "Quax", "Murn", "Telo", "Vesk", "Oran", "Pym"]


def write_capitals_dataset(d, places=CAPITALS, answer_end="."):
    """Chat records teaching made-up capitals: train.jsonl (one per place) and eval.jsonl (the
    first 3)."""
    import json

    rows = [
        {"messages": [{"role": "user", "content": f"What is the capital of {p}?"},
                      {"role": "assistant", "content": f"The capital of {p} is {p}ville{answer_end}"}]}
        for p in places
    ]  # fmt: skip
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return d


def train_config(dataset, out, **overrides):
    """A short CPU fine-tune of the tiny model on write_capitals_dataset's files."""
    from g3n.train.config import load_train_config

    base = {
        "train_data": [str(dataset / "train.jsonl")], "eval_data": [str(dataset / "eval.jsonl")], "output_dir": str(out),
        "batch_size": 2, "max_steps": 6, "save_steps": 3, "eval_steps": 3, "learning_rate": 3e-3, "lora_r": 8, "max_length": 64,
        "device": "cpu",
    }  # fmt: skip
    return load_train_config(base={**base, **overrides})


def teacher_forced(model, ids, prompt_len, **generator_kw):
    """Logits (on the CPU) at every position from the engine: prefill(prompt) + one decode step
    per following token."""
    from g3n.inference.engine import Generator

    gen = Generator(model, 1, ids.shape[1], **generator_kw)
    out = [gen.prefill(0, ids[0, :prompt_len])]
    for pos in range(prompt_len, ids.shape[1]):
        out.append(gen.step(ids[:, pos], [pos]).logits.clone())
    return torch.stack(out, dim=1).cpu()


def run_requests(engine, requests, start_at=None, full=False):
    """Step an inference Engine through `requests` until all are done: the tokens of each (`full`:
    the Token objects); `start_at[i]`: the engine step at which request i is added (default 0)."""
    start_at = start_at or [0] * len(requests)
    handles, out, step = {}, {}, 0
    while len(handles) < len(requests) or engine.busy:
        for i, r in enumerate(requests):
            if i not in handles and start_at[i] <= step:
                handles[i] = engine.add(r)
                out[handles[i]] = []
        for t in engine.step():
            out[t.handle].append(t if full else t.token)
        step += 1
    return [out[handles[i]] for i in range(len(requests))]


def record_layer_compiles(monkeypatch) -> dict[str, list]:
    """Make the engine's per-layer compile (its parts: the step's inputs, each kind of layer, the
    logits) trace (fullgraph) through a backend that records each graph and runs it as traced;
    returns {"inputs" | "layer" | "logits": the graphs traced for that part}."""
    from g3n.inference import decode

    graphs = {"inputs": [], "layer": [], "logits": []}

    def recorded(fn, part):
        def backend(gm, example_inputs):
            graphs[part].append(gm)
            return gm.forward

        return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)

    parts = (recorded(decode.step_inputs, "inputs"), recorded(decode.decode_layer_cached, "layer"),
             recorded(decode.step_logits, "logits"))  # fmt: skip
    monkeypatch.setattr(decode, "_compiled_parts", lambda: parts)
    return graphs


def fake_cuda_graph(monkeypatch) -> None:
    """Let a CPU engine built with cuda_graph=True go through its capture (the compile, its
    fallbacks, the warm-up) as on a GPU: warm-up steps run in place of on a side stream, and the
    "graph" runs the captured step once, at capture; replays do nothing (so steps after the first
    return the first step's output)."""
    from g3n.inference.engine import Generator

    class Graph:
        def replay(self):
            pass

    def warm_up(run):
        for _ in range(2):
            run()

    monkeypatch.setattr(Generator, "_warm_up", staticmethod(warm_up))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())


def replaying_cuda_graph(monkeypatch) -> None:
    """fake_cuda_graph, with replays that run the captured step again on the graph's own input
    buffers and copy its results into the captured outputs, as a CUDA graph replay does (eager,
    uncompiled steps only): the engine's buffer handling across steps and requests is exercised."""
    import dataclasses

    from g3n.inference.decode import decode_logits
    from g3n.inference.engine import Generator

    fake_cuda_graph(monkeypatch)
    capture = Generator._capture

    def replaying(self, key, *args):
        capture(self, key, *args)
        _, inputs, out = self.graphs[key]

        class Replay:
            def replay(_):
                new = self._run(inputs, key, decode_logits, self.fused)
                for f in dataclasses.fields(out):
                    if getattr(out, f.name) is not None:
                        getattr(out, f.name).copy_(getattr(new, f.name))

        self.graphs[key] = (Replay(), inputs, out)

    monkeypatch.setattr(Generator, "_capture", replaying)


def run_under_triton_interpreter(path: str, passed: int, timeout: int) -> None:
    """Run the test module `path` again in a subprocess with TRITON_INTERPRET=1 (Triton reads it
    when kernels are defined), where its real tests are collected: all `passed` of them pass and
    none is skipped."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", path],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert f"{passed} passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


# ---- serve ------------------------------------------------------------------------------------
QUESTION = "What is the capital of France?"
WIDE = {"temperature": 2.0, "top_k": 0, "top_p": 1.0}  # the whole vocabulary, no repeating loop


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port, in a thread (a context manager).
    With `limits`, uvicorn gets serve.server_config's settings for them, as `g3n serve` does."""

    def __init__(self, app, limits=None):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if limits is None:
            config = uvicorn.Config(app, log_level="warning", lifespan="on")
        else:
            from g3n.serve import server_config

            config = server_config(app, "127.0.0.1", self.port, limits, "critical")
        self.server = uvicorn.Server(config)

    def __enter__(self):
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def request(server, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON or text) of one request; body: dict (sent as JSON) or bytes."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(raw)
    except json.JSONDecodeError:
        return resp.status, raw


def chat_body(content):
    """A chat request's body for the tiny model: one user message with this content."""
    return {"model": "tiny", "messages": [{"role": "user", "content": content}]}


def chat(server, content=QUESTION, **kw):
    """(status, parsed JSON) of a chat completion request."""
    return request(server, "POST", "/v1/chat/completions", chat_body(content) | kw)


def stream_chunks(server, path, body, timeout=120):
    """The parsed data chunks of a streamed reply to `body` (sent with stream: true), up to [DONE]."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    chunks = []
    for line in resp:
        line = line.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    conn.close()
    return chunks


def health(server):
    return request(server, "GET", "/health")[1]


def wait_idle(server, seconds=10.0):
    """The server's /health once nothing runs or waits; fails after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = health(server)
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"still busy after {seconds}s: {health(server)}")


@contextlib.contextmanager
def no_stop_tokens():
    """Replies whose batch starts inside run to their max_tokens: no stop tokens (the engine reads
    them when a batch starts). Even sampling the whole vocabulary at temperature 2, the tiny model
    ends its stories within about 20 tokens, which a loaded machine can finish before a test looks
    at the slot they hold (a CI run did)."""
    from g3n.tokenizer import Tokenizer

    original = Tokenizer.stop_ids
    Tokenizer.stop_ids = property(lambda self: set())
    try:
        yield
    finally:
        Tokenizer.stop_ids = original


def send_chat(server, body):
    """A raw socket that sent this chat request (HTTP/1.1), left open for the reply."""
    import json
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n{data}".encode())  # fmt: skip
    return sock


def open_stream(server, max_tokens=1500, **kw):
    """A raw socket streaming a long reply (no stop tokens: `no_stop_tokens`), returned once the
    first token arrived."""
    options = {"stream": True, "max_tokens": max_tokens, "seed": 1, **WIDE, **kw}
    with no_stop_tokens():
        sock = send_chat(server, chat_body("Tell me a story.") | options)
        seen = b""
        while b'"content": "' not in seen.split(b'"role"', 1)[-1]:
            seen += sock.recv(4096)
    return sock


def queued_chat(server, max_tokens):
    """A raw socket whose chat request ("Hi") waits in the server's queue (its batch is full),
    returned once /health counts it."""
    import time

    sock = send_chat(server, chat_body("Hi") | {"max_tokens": max_tokens})
    deadline = time.monotonic() + 10
    while health(server)["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return sock
