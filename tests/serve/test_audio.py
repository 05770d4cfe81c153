"""POST /v1/audio/transcriptions and /v1/audio/translations through the official openai client:
a tiny random multimodal checkpoint answers with the text g3n's own greedy generation gives for the
same clip and Google's prompt, and bad requests get OpenAI's 400 naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("starlette")
pytest.importorskip("python_multipart")
soundfile = pytest.importorskip("soundfile")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from g3n.inference.backends import load_engine
from g3n.inference.generate import stream_text
from g3n.inference.sampling import SamplingParams
from g3n.media import MediaProcessor, read_audio
from g3n.serve import Limits, create_app
from g3n.serve.audio import instruction
from helpers import ServerThread, make_hf_multimodal, save_hf_multimodal

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    mm_dir = save_hf_multimodal(make_hf_multimodal(), tmp_path_factory.mktemp("mm"))
    engine = load_engine(mm_dir, dtype="float32", device="cpu", modalities="all", lazy_towers=False)
    with ServerThread(create_app(engine, Limits(max_tokens=MAX_TOKENS))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield server, client, engine, mm_dir.name


def wav(seconds: float = 0.75, rate: int = 24000) -> bytes:
    """A WAV file of noise (at 24 kHz: the server resamples it to 16 kHz)."""
    samples = (np.random.default_rng(0).standard_normal(int(seconds * rate)) * 0.1).astype("float32")
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV")
    return out.getvalue()


def direct(engine, data: bytes, text: str, prompt_tokens: list | None = None) -> str:
    """What g3n generates for this clip and instruction, greedily, without the server (the prompt's
    length appended to `prompt_tokens`)."""
    samples, rate = read_audio(io.BytesIO(data), "clip")
    clip = {"type": "audio", "audio": samples.mean(axis=1), "sampling_rate": rate}
    message = {"role": "user", "content": [clip, {"type": "text", "text": text}]}
    ids, media = MediaProcessor(engine.model_dir)(engine.tok, [message])
    if prompt_tokens is not None:
        prompt_tokens.append(len(ids))
    greedy = SamplingParams(greedy=True, max_new_tokens=MAX_TOKENS)
    return "".join(stream_text(engine.model, engine.tok, ids, greedy, media)).strip()


def param_of(call) -> tuple[int, str | None, str]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value.response.json()["error"]
    return info.value.status_code, error["param"], error["message"]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client's translations.create
def test_transcription_and_translation_are_g3ns_greedy_reply(served):
    _, client, engine, name = served
    data = wav()
    out = client.audio.transcriptions.create(model=name, file=("clip.wav", data), language="fr", prompt="Zoë")
    assert instruction("transcribe", "French", "Zoë").startswith(
        "Transcribe the following speech segment in French into French text."
    )
    prompt_tokens = []
    assert out.text == direct(engine, data, instruction("transcribe", "French", "Zoë"), prompt_tokens)
    assert out.usage.input_tokens == prompt_tokens[0]  # the clip's soft tokens count
    assert 0 < out.usage.output_tokens <= MAX_TOKENS

    text = client.audio.transcriptions.create(model=name, file=("clip.wav", data), response_format="text")
    assert text == direct(engine, data, instruction("transcribe", None))

    # Google's AST prompt: the reply is the part after "English: ", or all of it when the model gives none
    reply = direct(engine, data, instruction("translate", "German"))
    assert "English:" not in reply  # the random model never writes the marker
    out = client.audio.translations.create(model=name, file=("clip.wav", data), extra_body={"language": "de"})
    assert out.text == reply
    text = client.audio.translations.create(model=name, file=("clip.wav", data), response_format="text")
    assert text == direct(engine, data, instruction("translate", None))


def test_bad_requests_name_the_field(served):
    server, client, _, name = served
    data, url = wav(), server.url + "/v1/audio/transcriptions"

    def create(**kw):
        return lambda: client.audio.transcriptions.create(**{"model": name, "file": ("clip.wav", data), **kw})

    status, param, message = param_of(create(file=("long.wav", wav(31, 16000))))
    assert (status, param) == (400, "file") and "31.0 s" in message and "at most 30 s" in message
    status, param, message = param_of(create(file=("x.wav", b"not audio at all")))
    assert (status, param) == (400, "file") and "not an audio file" in message, message
    assert param_of(create(language="xx"))[:2] == (400, "language")
    assert param_of(create(response_format="verbose_json"))[:2] == (400, "response_format")
    assert param_of(create(temperature=1.5))[:2] == (400, "temperature")
    assert param_of(create(model="whisper-1"))[:2] == (404, "model")

    missing = httpx.post(url, files={"model": (None, name)})  # a multipart form without a file part
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    as_json = httpx.post(url, json={"model": name})
    assert as_json.status_code == 415 and "multipart" in as_json.json()["error"]["message"]
    # a web page on another origin can post a form without a preflight: refused before the body is read
    page = httpx.post(url, data={"model": name}, files={"file": ("clip.wav", data)},
                      headers={"Origin": "http://evil.example"})  # fmt: skip
    assert page.status_code == 403 and page.json()["error"]["code"] == "cross_origin"
    own = httpx.post(url, data={"model": name, "response_format": "text"}, files={"file": ("clip.wav", data)},
                     headers={"Origin": server.url})  # fmt: skip
    assert own.status_code == 200, own.text


def test_text_only_model_has_no_audio_tower(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    status, param, message = param_of(lambda: client.audio.transcriptions.create(model="tiny", file=("a.wav", wav())))
    assert (status, param) == (400, "model") and "audio tower" in message
