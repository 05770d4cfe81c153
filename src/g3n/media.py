"""Images and audio into model inputs: files read with clear errors, transformers' own image
processor and audio feature extractor from the checkpoint, and prompts with each image/clip
expanded to Gemma 3n's token sequence.

A chat part {"type": "image", "image": PIL image or path} or {"type": "audio", "audio": path or
float array, "sampling_rate": Hz} sits where the user put it; the prompt gets, as transformers'
Gemma3nProcessor writes it, "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n" (audio
alike), and the tensors go to the towers in prompt order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from g3n.errors import G3nError
from g3n.model.towers import MediaTokens, read_hf_config, require_transformers
from g3n.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, format_chat, with_single_bos

SAMPLING_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0  # the processor's 188 soft tokens cover 30 s
MAX_AUDIO_SAMPLES = 2**24  # frames x channels decoded per clip (64 MiB as float32): 30 s of 8 channels at 48 kHz fits


def load_image(path):
    """An RGB PIL image from a file (errors name the file)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise G3nError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise G3nError(f"{path}: not an image that can be read (corrupt or unsupported format: {e})") from None


def load_audio(path) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a wav/flac/ogg/mp3 file (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise G3nError(f"{path}: audio file not found")
    data, rate = read_audio(str(path), str(path))
    return prepare_audio(data.mean(axis=1), rate, str(path))


def read_audio(source, name: str, max_samples: int = MAX_AUDIO_SAMPLES) -> tuple[np.ndarray, int]:
    """(float32 frames x channels, sample rate) of a file or file object, refused from its header
    when over 30 s or `max_samples` (frames x channels), and never reading more than that (a
    header may not know or tell the length)."""
    import soundfile

    try:
        with soundfile.SoundFile(source) as f:
            rate, channels = f.samplerate, f.channels
            limit = min(int(MAX_AUDIO_SECONDS * rate), max_samples // max(channels, 1))
            if f.frames > limit:
                raise G3nError(_too_long(name, f.frames, rate, channels, max_samples))
            data = f.read(frames=limit + 1, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        # soundfile names a file object by its repr (<_io.BytesIO object at 0x...>): keep only the reason
        reason = getattr(e, "error_string", None) or re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the data", str(e))
        raise G3nError(
            f"{name}: not an audio file that can be read (corrupt or unsupported format: {reason})"
        ) from None
    if len(data) > limit:
        raise G3nError(_too_long(name, len(data), rate, channels, max_samples))
    return data, rate


def _too_long(name: str, frames: int, rate: int, channels: int, max_samples: int) -> str:
    if frames > MAX_AUDIO_SECONDS * rate:
        return f"{name}: {frames / rate:.1f} s of audio; Gemma 3n takes at most {MAX_AUDIO_SECONDS:.0f} s per clip"
    return f"{name}: {frames} frames x {channels} channels is more than {max_samples} samples per clip"


def prepare_audio(samples, rate: int, name: str = "audio") -> np.ndarray:
    """Mono float32 at 16 kHz, at most 30 s (longer clips are refused, not silently cut)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise G3nError(f"{name}: expected a non-empty mono waveform, got shape {list(samples.shape)}")
    seconds = samples.size / rate
    if seconds > MAX_AUDIO_SECONDS:
        raise G3nError(f"{name}: {seconds:.1f} s of audio; Gemma 3n takes at most {MAX_AUDIO_SECONDS:.0f} s per clip")
    if rate != SAMPLING_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLING_RATE).astype(np.float32)
    return samples


class MediaProcessor:
    """Chat messages with image/audio parts -> (prompt ids, media tensors) for one model."""

    def __init__(self, model_dir: str | Path):
        require_transformers()
        from transformers import AutoImageProcessor, Gemma3nAudioFeatureExtractor, SiglipImageProcessor

        model_dir = Path(model_dir)
        self.tokens = MediaTokens.from_config(read_hf_config(model_dir))
        if (model_dir / "preprocessor_config.json").is_file():
            self.images = AutoImageProcessor.from_pretrained(model_dir)
            self.audio = Gemma3nAudioFeatureExtractor.from_pretrained(model_dir)
        else:  # Gemma 3n's published settings
            size = {"height": 768, "width": 768}
            self.images = SiglipImageProcessor(size=size, do_normalize=False, resample=2)
            self.audio = Gemma3nAudioFeatureExtractor()

    def __call__(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True):
        """(ids, media): media holds pixel_values and/or input_features + input_features_mask."""
        images, clips = [], []
        for n, msg in enumerate(messages):
            parts = msg.get("content") if isinstance(msg.get("content"), list) else []
            for i, part in enumerate(parts):
                where = f"message {n}, part {i}"
                if part.get("type") == "image":
                    images.append(_image_of(part, where))
                elif part.get("type") == "audio":
                    clips.append(_audio_of(part, where))
        text = format_chat(messages, add_generation_prompt, media=True)
        ids = with_single_bos(expand_placeholders(tokenizer, text, self.tokens), tokenizer.bos_id)
        return ids, self.tensors(images, clips)

    def tensors(self, images: list, clips: list[np.ndarray]) -> dict:
        """Model inputs for PIL images and 16 kHz waveforms, in prompt order."""
        media = {}
        if images:
            media["pixel_values"] = self.images(images, return_tensors="pt")["pixel_values"]
        if clips:
            feats = self.audio(clips, return_tensors="pt", sampling_rate=SAMPLING_RATE)
            media["input_features"] = feats["input_features"]
            media["input_features_mask"] = feats["input_features_mask"].bool()
        return media

    def load(self, items) -> dict:
        """Model inputs for (kind, path) pairs (a training batch's files), in order."""
        images = [load_image(path) for kind, path in items if kind == "image"]
        clips = [load_audio(path) for kind, path in items if kind == "audio"]
        return self.tensors(images, clips)


def media_ids(tokens: MediaTokens) -> set[int]:
    """Ids that stand for images/audio (markers and soft tokens): never training targets."""
    return {tokens.boi, tokens.eoi, tokens.image, tokens.boa, tokens.eoa, tokens.audio}


def expand_placeholders(tokenizer, text: str, tokens: MediaTokens) -> list[int]:
    """Token ids of formatted chat text (no BOS added), each image/audio placeholder expanded to
    "\n\n" + boi + soft tokens + eoi + "\n\n" as transformers' Gemma3nProcessor writes it."""
    seq = {
        IMAGE_PLACEHOLDER: [tokens.boi] + [tokens.image] * tokens.image_count + [tokens.eoi],
        AUDIO_PLACEHOLDER: [tokens.boa] + [tokens.audio] * tokens.audio_count + [tokens.eoa],
    }
    ids: list[int] = []
    pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})", text)
    for i, piece in enumerate(pieces):
        if piece in seq:
            ids.extend(seq[piece])
            continue
        # The blank lines around a media sequence belong to the text beside it, as transformers
        # tokenizes them (split at the special tokens).
        before = "\n\n" if i > 0 else ""
        after = "\n\n" if i < len(pieces) - 1 else ""
        if before + piece + after:
            ids.extend(tokenizer.encode(before + piece + after, add_bos=False))
    return ids


def _image_of(part: dict, where: str):
    image = part.get("image", part.get("path"))
    if isinstance(image, (str, Path)):
        return load_image(image)
    if image is None or not hasattr(image, "convert"):
        raise G3nError(f"{where}: an image part needs 'image' (a PIL image or a file path)")
    return image.convert("RGB")


def _audio_of(part: dict, where: str) -> np.ndarray:
    audio = part.get("audio", part.get("path"))
    if isinstance(audio, (str, Path)):
        return load_audio(audio)
    if isinstance(audio, (np.ndarray, torch.Tensor, list)):
        rate = part.get("sampling_rate", SAMPLING_RATE)
        return prepare_audio(np.asarray(audio, dtype=np.float32), int(rate), where)
    raise G3nError(f"{where}: an audio part needs 'audio' (a file path or a float waveform with 'sampling_rate')")
