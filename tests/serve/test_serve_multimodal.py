"""g3n serve with a multimodal checkpoint (transformers' tiny random Gemma3nForConditionalGeneration):
images and audio sent as OpenAI content parts get the reply g3n's own generation gives for the
same files, while text requests sent at the same time still batch and stay correct."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("starlette")

from g3n.inference.backends import load_engine
from g3n.inference.generate import generate
from g3n.inference.sampling import SamplingParams
from g3n.media import MediaProcessor
from g3n.serve import create_app
from helpers import ServerThread, make_hf_multimodal, request, save_hf_multimodal


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    mm_dir = save_hf_multimodal(make_hf_multimodal(), tmp_path_factory.mktemp("mm"))
    engine = load_engine(mm_dir, dtype="float32", device="cpu", modalities="all", lazy_towers=False)
    with ServerThread(create_app(engine)) as server:
        yield server, engine, mm_dir


def _media():
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((48, 80, 3)) * 255).astype("uint8"))
    png, wav = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG")
    samples = (rng.standard_normal(12000) * 0.1).astype("float32")
    soundfile.write(wav, samples, 24000, format="WAV")
    return image, samples, png.getvalue(), wav.getvalue()


def test_images_and_audio_get_g3ns_reply(served):
    server, engine, mm_dir = served
    image, samples, png, wav = _media()
    status, models = request(server, "GET", "/v1/models")
    assert models["data"][0]["modalities"] == ["audio", "image", "text"]
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
        {"type": "text", "text": "What is it?"},
    ]
    ours = {"role": "user", "content": [{"type": "image", "image": image},
                                        {"type": "audio", "audio": samples, "sampling_rate": 24000},
                                        {"type": "text", "text": "What is it?"}]}  # fmt: skip
    model, tok = engine.model, engine.tok
    ids, media = MediaProcessor(mm_dir)(tok, [ours])
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    expected = tok.decode(generate(model, [ids], greedy, tok.stop_ids, 0, media)[0])
    texts = ["Hi", "What is 2+3?"]
    text_expected = [
        tok.decode(generate(model, [tok.encode_chat([{"role": "user", "content": t}])], greedy, tok.stop_ids)[0])
        for t in texts
    ]

    results = {}

    def ask(key, content):
        body = {"model": mm_dir.name, "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 6}  # fmt: skip
        results[key] = request(server, "POST", "/v1/chat/completions", body)

    threads = [threading.Thread(target=ask, args=("media", parts))]
    threads += [threading.Thread(target=ask, args=(t, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    status, out = results["media"]
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == expected
    assert out["usage"]["prompt_tokens"] == len(ids)  # the image and audio soft tokens count
    for t, want in zip(texts, text_expected):
        assert results[t][0] == 200 and results[t][1]["choices"][0]["message"]["content"] == want


def test_bad_media_for_a_multimodal_model(served):
    import soundfile

    server, _, mm_dir = served
    long_audio = io.BytesIO()
    soundfile.write(long_audio, np.zeros(16000 * 31, dtype="float32"), 16000, format="WAV")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(long_audio.getvalue()).decode()}}
    body = {"model": mm_dir.name, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "x"}]}]}
    status, out = request(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and "at most 30 s" in out["error"]["message"] and out["error"]["param"] == "messages", out
    assert request(server, "GET", "/health")[1]["status"] == "ok"
