"""Gemma 3n's vision and audio towers, run in front of g3n's decoder.

The towers are transformers' own modules (MobileNetV5 through timm, the USM-style conformer) and
their embedders, built from the checkpoint's config and given the checkpoint's tensors by name:
g3n owns the decoder, not copies of the encoders. Only the parts a task asks for are read.

`embed(input_ids, text_embeds, media)` reproduces `Gemma3nModel.forward`'s merge exactly: ids in
the vision/audio vocab ranges take the embedders' hard embeddings, and the image/audio soft-token
positions receive the towers' features.

float16: the vision tower's large Conv2D weights (abs max up to 98) overflow float16 when applied.
With `fp16_safe`, its convolutions upcast input and weight on the fly and return float32, so the
whole tower computes in float32 from float16-stored weights (no float32 copies kept).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from g3n.checkpoint.reader import TensorIndex
from g3n.errors import G3nError

PARTS = ("image", "audio")
TOWER_OF = {"image": "vision_tower", "audio": "audio_tower"}
TOWER_PREFIX = "model."


def require_transformers():
    """transformers (and timm for images) build the towers: an optional dependency."""
    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise G3nError(f"images and audio need the multimodal extra: pip install 'g3n[multimodal]' ({e})") from None


def multimodal_config(model_dir) -> dict | None:
    """config.json of a multimodal checkpoint, or None for a text-only one (such as `tiny`). The
    one rule g3n applies everywhere: a Gemma3nForConditionalGeneration config, with both
    vision_config and audio_config (transformers would fill a missing one with defaults)."""
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    return raw if "vision_config" in raw and "audio_config" in raw else None


def checkpoint_modalities(model_dir) -> list[str]:
    """The media a checkpoint's towers take: all of PARTS for a multimodal one, [] for text-only."""
    return list(PARTS) if multimodal_config(model_dir) is not None else []


def read_hf_config(model_dir: Path):
    """transformers' Gemma3nConfig of a multimodal checkpoint (a clear error for a text-only one)."""
    require_transformers()
    from transformers import Gemma3nConfig

    raw = multimodal_config(model_dir)
    if raw is None:
        raise G3nError(
            f"{Path(model_dir) / 'config.json'}: a text-only checkpoint (no vision_config/audio_config); images "
            "and audio need a Gemma3nForConditionalGeneration checkpoint"
        )
    return Gemma3nConfig.from_dict(raw)


@dataclass(frozen=True)
class MediaTokens:
    """Token ids and counts of the image and audio sequences the prompt carries."""

    boi: int
    eoi: int
    image: int
    image_count: int
    boa: int
    eoa: int
    audio: int
    audio_count: int

    @classmethod
    def from_config(cls, cfg) -> MediaTokens:
        """From transformers' Gemma3nConfig or config.json's dict (Gemma 3n's values when absent),
        so text-side work such as tokenizing a dataset needs no transformers."""
        get = cfg.get if isinstance(cfg, dict) else lambda key, default: getattr(cfg, key, default)
        return cls(*(get(key, default) for key, default in _TOKEN_DEFAULTS))


_TOKEN_DEFAULTS = (
    ("boi_token_id", 255999),
    ("eoi_token_id", 262144),
    ("image_token_id", 262145),
    ("vision_soft_tokens_per_image", 256),
    ("boa_token_id", 256000),
    ("eoa_token_id", 262272),
    ("audio_token_id", 262273),
    ("audio_soft_tokens_per_image", 188),
)


def _conv2d_float32(self, x):
    """Conv2d.forward with float32 accumulation: input and weight upcast on the fly."""
    bias = self.bias.float() if self.bias is not None else None
    return self._conv_forward(x.float(), self.weight.float(), bias)


def _conv2d_same_float32(self, x):
    """timm's Conv2dSame (TF 'same' padding) with float32 accumulation."""
    from timm.layers.conv2d_same import conv2d_same

    bias = self.bias.float() if self.bias is not None else None
    return conv2d_same(x.float(), self.weight.float(), bias, self.stride, self.padding, self.dilation, self.groups)


def make_convs_fp16_safe(module: nn.Module) -> int:
    """Run every Conv2d of `module` in float32 (weights stay stored as they are); returns the count.
    Later ops see float32 activations and promote, so norms and attention compute in float32 too."""
    from timm.layers.conv2d_same import Conv2dSame

    n = 0
    for m in module.modules():
        forward = {nn.Conv2d: _conv2d_float32, Conv2dSame: _conv2d_same_float32}.get(type(m))
        if forward is None and isinstance(m, nn.Conv2d):
            raise NotImplementedError(f"no float32 path for {type(m).__name__}")
        if forward is not None:
            m.forward = types.MethodType(forward, m)
            n += 1
    return n


class Towers(nn.Module):
    """Vision and/or audio tower plus both multimodal embedders, named as in the checkpoint
    (after its `model.` prefix)."""

    def __init__(self, cfg, parts=PARTS):
        super().__init__()
        from transformers import AutoModel
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

        unknown = set(parts) - set(PARTS)
        if unknown:
            raise G3nError(f"unknown modality {min(unknown)!r} (use {', '.join(PARTS)})")
        self.cfg, self.parts = cfg, tuple(p for p in PARTS if p in parts)
        self.tokens = MediaTokens.from_config(cfg)
        self.embed_vision = Gemma3nMultimodalEmbedder(cfg.vision_config, cfg.text_config)
        self.embed_audio = Gemma3nMultimodalEmbedder(cfg.audio_config, cfg.text_config)
        if "image" in self.parts:
            self.vision_tower = AutoModel.from_config(cfg.vision_config)
        if "audio" in self.parts:
            self.audio_tower = Gemma3nAudioEncoder(cfg.audio_config)

    # ---- features --------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, soft tokens, text hidden) from (images, 3, H, W)."""
        vc = self.cfg.vision_config
        out = self.vision_tower(pixel_values=pixel_values, do_pooling=False, return_dict=True).last_hidden_state
        out = out.reshape(out.shape[0], vc.hidden_size, self.cfg.vision_soft_tokens_per_image).permute(0, 2, 1)
        dtype = self.embed_vision.embedding.weight.dtype
        return self.embed_vision(inputs_embeds=(out * vc.hidden_size**0.5).to(dtype))

    def audio_features(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(clips, audio_soft_tokens_per_image, text hidden): the tower's encodings, padding frames
        and the rest up to the fixed count filled with the last audio-vocab embedding."""
        out = self.audio_tower(features, ~mask, return_dict=True)
        feats = self.embed_audio(inputs_embeds=out.last_hidden_state)
        pad_id = self.embed_audio.vocab_offset + self.embed_audio.vocab_size - 1
        pad = self.embed_audio(input_ids=torch.tensor([[pad_id]], device=feats.device))
        feats = torch.where(out.audio_mel_mask.unsqueeze(-1), pad, feats)
        extra = self.cfg.audio_soft_tokens_per_image - feats.shape[1]
        if extra < 0:
            raise G3nError(f"audio gives {feats.shape[1]} soft tokens, more than the model's {extra + feats.shape[1]}")
        return torch.cat([feats, pad.expand(feats.shape[0], extra, -1)], dim=1)

    # ---- merge -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, embeds: torch.Tensor, media: dict | None) -> torch.Tensor:
        """The decoder's input embeddings: text `embeds` with multimodal ids and features merged in.

        `media`: pixel_values (images, 3, H, W) and/or input_features + input_features_mask
        (clips, frames, mel bins), in prompt order."""
        media = media or {}
        ev, ea = self.embed_vision, self.embed_audio
        for emb, lo, hi in ((ev, ev.vocab_offset, ea.vocab_offset), (ea, ea.vocab_offset, None)):
            in_range = (input_ids >= lo) if hi is None else (input_ids >= lo) & (input_ids < hi)
            if in_range.any():
                dummy = emb.vocab_offset + emb.vocab_size - 1
                hard = emb(input_ids=torch.where(in_range, input_ids, dummy)).to(embeds.dtype)
                embeds = torch.where(in_range.unsqueeze(-1), hard, embeds)
        t = self.tokens
        for kind, token, count in (("image", t.image, t.image_count), ("audio", t.audio, t.audio_count)):
            slots = input_ids == token
            n_media = int(slots.sum()) // count if count else 0
            given = media.get("pixel_values") if kind == "image" else media.get("input_features")
            n_given = 0 if given is None else given.shape[0]
            if int(slots.sum()) != n_given * count:
                raise G3nError(
                    f"the prompt has {int(slots.sum())} {kind} soft tokens ({n_media} {kind}s of {count}) "
                    f"but {n_given} {kind}(s) were given"
                )
            if not n_given:
                continue
            if kind not in self.parts:
                raise G3nError(f"the model was loaded without its {kind} tower")
            if kind == "image":
                feats = self.image_features(given.to(embeds.device, self._dtype("vision_tower")))
            else:
                mask = media["input_features_mask"].to(embeds.device)
                feats = self.audio_features(given.to(embeds.device, self._dtype("audio_tower")), mask)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    def _dtype(self, tower: str) -> torch.dtype:
        return next(getattr(self, tower).parameters()).dtype


def _materialize_buffers(towers: Towers, device) -> None:
    """Buffers computed in __init__ (masks, scales) are lost on the meta device: recompute them
    with transformers' own initialisers."""
    towers.to_empty(device=device)
    owners = []
    for tower_name in ("audio_tower", "vision_tower"):
        tower = getattr(towers, tower_name, None)
        if tower is None:
            continue
        for m in tower.modules():
            if any(True for _ in m.buffers(recurse=False)):
                owners.append((tower, m))
    with torch.no_grad():
        for tower, m in owners:
            tower._init_weights(m)


def add_towers(model, model_dir: Path, parts) -> Towers:
    """Give `model` (a g3n decoder) the towers of `parts` it lacks, keeping the ones it has (with
    any adapters on them); returns model.towers."""

    have = set(model.towers.parts) if model.towers is not None else set()
    missing = sorted(set(parts) - have)
    if missing:
        new = load_towers(model_dir, TensorIndex(model_dir), missing, model.dtype, model.device)
        if model.towers is None:
            model.towers = new
        else:
            for part in missing:
                name = TOWER_OF[part]
                setattr(model.towers, name, getattr(new, name))
            model.towers.parts = tuple(p for p in PARTS if p in have | set(missing))
    return model.towers


def load_towers(model_dir: Path, index, parts, dtype: torch.dtype, device, fp16_safe: bool | None = None) -> Towers:
    """The requested towers with the checkpoint's weights (`index`: checkpoint/reader.py's TensorIndex)."""
    cfg = read_hf_config(model_dir)
    with torch.device("meta"):
        towers = Towers(cfg, parts)
    shapes = {n: t.shape for n, t in towers.state_dict().items()}  # parameters and stored buffers
    names = list(shapes)
    missing = [TOWER_PREFIX + n for n in names if TOWER_PREFIX + n not in index.file_of]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise G3nError(f"{model_dir}: checkpoint lacks tower tensor(s) {', '.join(missing[:3])}{more}")
    _materialize_buffers(towers, device)
    state = {}
    for n in names:
        t = index.read(TOWER_PREFIX + n, shapes[n])
        state[n] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    towers.load_state_dict(state, strict=True, assign=True)
    if fp16_safe is None:
        fp16_safe = dtype == torch.float16
    if fp16_safe and "image" in towers.parts:
        make_convs_fp16_safe(towers.vision_tower)
    towers.requires_grad_(False)
    return towers.eval()
