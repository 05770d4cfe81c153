"""Chat messages as OpenAI clients send them -> HF-style content lists.

    {"type": "text", "text": ...}                                  -> {"type": "text", "text": ...}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
                                                                   -> {"type": "image", "image": PIL.Image (RGB)}
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}
                                                                   -> {"type": "audio", "audio": float32 mono array,
                                                                       "sampling_rate": int}

The whole request is checked, and the caller asked (`accept`) whether the model takes the kinds
of media present, before any image or audio is decoded; then each is decoded within a budget read
from its header (pixels, seconds, samples). A corrupt part is a 400 naming its message and part.
Remote image URLs are refused: the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import io

from g3n.errors import G3nError
from g3n.media import MAX_AUDIO_SAMPLES, read_audio
from g3n.serve.errors import bad

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "aiff"}
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP"]  # Pillow decoders tried; none of its exotic ones
MAX_REQUEST_PIXELS = 50_000_000  # all of a request's images (150 MB as RGB; a 48-megapixel photo fits)
MAX_REQUEST_SAMPLES = MAX_AUDIO_SAMPLES  # all of a request's audio, frames x channels (64 MiB as float32)


def _bad(message: str):
    return bad(message, "messages")


def parse_messages(messages, accept=None) -> tuple[list[dict], set[str]]:
    """(messages with string content or HF-style content lists, the kinds of content present).
    `accept(kinds)` is called before anything is decoded: it may refuse the request (or wait)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects")
    out, kinds = [], set()
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{n}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{n}]: role {_short(role)} is not supported (system, user, assistant or tool)")
        calls = {"tool_calls": msg["tool_calls"]} if role == "assistant" and msg.get("tool_calls") else {}
        content = msg.get("content")
        if content is None or isinstance(content, str):  # kept a string: formatted exactly as the CLI does
            kinds.add("text")
            out.append({"role": ROLES[role], "content": content or "", **calls})
            continue
        parts = _parts(content, n)
        kinds.update(p["type"] for p in parts)
        out.append({"role": ROLES[role], "content": parts, **calls})
    if accept is not None:
        accept(kinds)
    if kinds & {"image", "audio"}:
        _decode(out)
    return out, kinds


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else type(value).__name__ if value is not None else "None"
    return text if len(text) <= 40 else text[:37] + "..."


def _parts(content, n: int) -> list[dict]:
    """Parts checked and their media still undecoded (bytes; `where` kept for errors)."""
    if not isinstance(content, list):
        raise _bad(f"messages[{n}].content must be a string or a list of parts")
    parts = []
    for i, part in enumerate(content):
        where = f"messages[{n}].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            parts.append({"type": "image", "image": _image_bytes(part.get("image_url"), where), "where": where})
        elif kind == "input_audio":
            parts.append({"type": "audio", "audio": _audio_bytes(part.get("input_audio"), where), "where": where})
        elif kind == "text":
            raise _bad(f"{where}: a text part needs a string 'text', got {_short(part.get('text'))}")
        else:
            raise _bad(f"{where}: expected a text, image_url or input_audio part, got type {_short(kind)}")
    return parts


def _decode(messages: list[dict]) -> None:
    """Decode every image and clip in place, within the request's pixel and sample budgets."""
    pixels, samples = MAX_REQUEST_PIXELS, MAX_REQUEST_SAMPLES
    for msg in messages:
        for part in msg["content"] if isinstance(msg["content"], list) else []:
            if part["type"] == "image":
                part["image"], used = _image(part["image"], part.pop("where"), pixels)
                pixels -= used
            elif part["type"] == "audio":
                part["audio"], part["sampling_rate"], used = _audio(part["audio"], part.pop("where"), samples)
                samples -= used


def _b64(data, where: str, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise _bad(f"{where}: {what} data must be a non-empty base64 string")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: {what} data is not valid base64") from None


def _data_url(url: str, where: str, what: str) -> tuple[str, bytes]:
    """(media type, bytes) of a base64 data URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise _bad(f"{where}: {what} must be a base64 data URL (data:...;base64,...)")
    return header[5:-7], _b64(payload, where, what)


def _image_bytes(spec, where: str) -> bytes:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise _bad(f"{where}: image_url needs a 'url'")
    if url.startswith(("http://", "https://")):
        raise _bad(f"{where}: remote image URLs are not fetched by this server; send the image inline as a "
                   "data URL (data:image/png;base64,...)")  # fmt: skip
    return _data_url(url, where, "the image")[1]


def _image(data: bytes, where: str, budget: int):
    """(RGB PIL image, its pixels): the size read from the header is checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > budget:
                left = "" if budget == MAX_REQUEST_PIXELS else f" (of which {budget} are left after the others)"
                raise _bad(f"{where}: the image is {width}x{height} pixels; a request's images may have at most "
                           f"{MAX_REQUEST_PIXELS} pixels in all{left}")  # fmt: skip
            return img.convert("RGB"), width * height
    except UnidentifiedImageError:
        raise _bad(f"{where}: the image could not be decoded (not a {', '.join(IMAGE_FORMATS)} image)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _bad(f"{where}: the image could not be decoded ({e})") from None


def _audio_bytes(spec, where: str) -> bytes:
    if not isinstance(spec, dict):
        raise _bad(f"{where}: input_audio must be an object with 'data' and 'format'")
    fmt = spec.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
        raise _bad(f"{where}: audio format {_short(fmt)} is not supported ({', '.join(sorted(AUDIO_FORMATS))})")
    data = spec.get("data")
    if isinstance(data, str) and data.startswith("data:"):
        return _data_url(data, where, "the audio")[1]
    return _b64(data, where, "the audio")


def _audio(data: bytes, where: str, budget: int):
    """(float32 mono samples, sample rate, samples decoded): length checked from the header first."""
    try:
        samples, rate = read_audio(io.BytesIO(data), where, budget)
    except G3nError as e:
        message = str(e).replace("not an audio file that can be read", "the audio could not be decoded")
        raise _bad(message) from None
    if samples.shape[0] == 0:
        raise _bad(f"{where}: the audio is empty")
    return samples.mean(axis=1), int(rate), samples.size
