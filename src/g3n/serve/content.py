"""Chat messages as OpenAI clients send them -> HF-style content lists.

    {"type": "text", "text": ...}                                  -> {"type": "text", "text": ...}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
                                                                   -> {"type": "image", "image": PIL.Image (RGB)}
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}
                                                                   -> {"type": "audio", "audio": float32 mono array,
                                                                       "sampling_rate": int}

Images and audio are decoded here, so a corrupt part is a 400 naming its message and part even
when the model could not have used it. Remote image URLs are refused: the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import io

from g3n.serve.errors import bad

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_FORMATS = {"wav", "mp3", "flac", "ogg", "aiff"}


def _bad(message: str):
    return bad(message, "messages")


def parse_messages(messages) -> tuple[list[dict], set[str]]:
    """(messages with string content or HF-style content lists, the kinds of content present)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects")
    out, kinds = [], set()
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{n}] must be an object with 'role' and 'content'")
        role = ROLES.get(msg.get("role"))
        if role is None:
            raise _bad(f"messages[{n}]: role {msg.get('role')!r} is not supported (system, user or assistant)")
        content = msg.get("content")
        if content is None or isinstance(content, str):  # kept a string: formatted exactly as the CLI does
            kinds.add("text")
            out.append({"role": role, "content": content or ""})
            continue
        parts = _parts(content, n)
        kinds.update(p["type"] for p in parts)
        out.append({"role": role, "content": parts})
    return out, kinds


def _parts(content, n: int) -> list[dict]:
    if not isinstance(content, list):
        raise _bad(f"messages[{n}].content must be a string or a list of parts")
    parts = []
    for i, part in enumerate(content):
        where = f"messages[{n}].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            parts.append({"type": "image", "image": _image(part.get("image_url"), where)})
        elif kind == "input_audio":
            audio, rate = _audio(part.get("input_audio"), where)
            parts.append({"type": "audio", "audio": audio, "sampling_rate": rate})
        else:
            raise _bad(f"{where}: expected a text, image_url or input_audio part, got {str(part)[:80]}")
    return parts


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


def _image(spec, where: str):
    from PIL import Image, UnidentifiedImageError

    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise _bad(f"{where}: image_url needs a 'url'")
    if url.startswith(("http://", "https://")):
        raise _bad(f"{where}: remote image URLs are not fetched by this server; send the image inline as a "
                   "data URL (data:image/png;base64,...)")  # fmt: skip
    _, data = _data_url(url, where, "the image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise _bad(f"{where}: the image could not be decoded (not an image format Pillow reads)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(f"{where}: the image could not be decoded ({e})") from None


def _audio(spec, where: str):
    if not isinstance(spec, dict):
        raise _bad(f"{where}: input_audio must be an object with 'data' and 'format'")
    fmt = spec.get("format")
    if fmt is not None and str(fmt).lower() not in AUDIO_FORMATS:
        raise _bad(f"{where}: audio format {fmt!r} is not supported ({', '.join(sorted(AUDIO_FORMATS))})")
    data = spec.get("data")
    if isinstance(data, str) and data.startswith("data:"):
        _, raw = _data_url(data, where, "the audio")
    else:
        raw = _b64(data, where, "the audio")
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (RuntimeError, TypeError, ValueError, soundfile.LibsndfileError) as e:
        raise _bad(f"{where}: the audio could not be decoded ({e})") from None
    if samples.shape[0] == 0:
        raise _bad(f"{where}: the audio is empty")
    return samples.mean(axis=1), int(rate)
