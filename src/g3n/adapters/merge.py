"""Merging LoRA adapters into base weights: in memory (`merge_lora`), written out as a checkpoint
(`save_merged`), or streamed from a base checkpoint one tensor at a time (`merge_checkpoint`,
`AdapterDeltas`, which GGUF export uses too).

A multimodal base (Gemma3nForConditionalGeneration) is written whole, in its own layout: towers,
embedders and processor files included, tower adapters merged (`save_multimodal`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from g3n.adapters.lora import PEFT_PREFIX, read_adapter_config, read_adapter_weights, shape_error
from g3n.checkpoint.atomic import atomic_dir
from g3n.checkpoint.save import save_text_checkpoint, write_tokenizer_files
from g3n.errors import G3nError


@torch.no_grad()
def merge_lora(model):
    """Fold the adapters into the base weights and remove the LoRA layers (in place). Refused for
    4-bit weights (quant.refuse_merge says why); merge_checkpoint merges into the 16-bit originals."""
    from peft.tuners.lora import LoraLayer

    from g3n.model.quant import refuse_merge

    refuse_merge(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def save_merged(
    model, out_dir: str | Path, tokenizer_dir: str | Path | None = None, dtype=torch.bfloat16, overwrite: bool = False
) -> Path:
    """Merge the adapters (if any) and write an HF checkpoint with the tokenizer files copied; the
    directory appears complete or not at all."""
    from g3n.model.quant import refuse_merge

    refuse_merge(model, "writing a merged checkpoint from a model")
    merge_lora(model)
    return save_model_dir(model, out_dir, tokenizer_dir, dtype, overwrite)


def save_model_dir(
    model, out_dir: str | Path, tokenizer_dir: str | Path | None = None, dtype=torch.bfloat16, overwrite: bool = False
) -> Path:
    """An HF checkpoint of the model as it is (no adapters), tokenizer files copied; the directory
    appears complete or not at all. With a multimodal `tokenizer_dir` (the base checkpoint), the
    whole model in its layout: the decoder and any towers in memory as they are, the rest read
    from the base."""
    if tokenizer_dir is not None and _is_multimodal(tokenizer_dir):
        return save_multimodal(tokenizer_dir, out_dir, dtype, overwrite, own=_checkpoint_names(model, tokenizer_dir))
    with atomic_dir(out_dir, overwrite) as tmp:
        save_text_checkpoint(model, tmp, dtype)
        copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(out_dir)


def copy_tokenizer_files(tokenizer_dir: str | Path | None, out: Path) -> None:
    """Tokenizer and processor files, with a chat template that takes content parts (save.py)."""
    write_tokenizer_files(tokenizer_dir, out)


def merge_checkpoint(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype=torch.bfloat16, overwrite: bool = False
) -> Path:
    """The base checkpoint's own 16-bit text weights + the adapter's deltas (float32 sums), read,
    merged and written one tensor at a time (no model in memory; shards of SHARD_BYTES), with the
    tokenizer files: how a QLoRA run's adapter is merged, never into its 4-bit weights."""
    from g3n.checkpoint.save import save_tensors
    from g3n.model.load import TextTensors

    model_dir = Path(model_dir)
    if _is_multimodal(model_dir):
        return save_multimodal(model_dir, out_dir, dtype, overwrite, deltas=AdapterDeltas(adapter_dir, towers=True))
    tensors, deltas = TextTensors(model_dir), AdapterDeltas(adapter_dir)
    try:
        deltas.check(tensors.shapes, model_dir)
    except G3nError:
        tensors.close()
        raise

    def merged():
        for name in tensors.shapes:
            yield name, deltas.merge(name, tensors.read(name)).to(dtype)

    try:
        with atomic_dir(out_dir, overwrite) as tmp:
            save_tensors(merged(), tensors.config, tmp, dtype)
            copy_tokenizer_files(model_dir, tmp)
    finally:
        tensors.close()
    return Path(out_dir)


def _is_multimodal(model_dir) -> bool:
    from g3n.model.towers import multimodal_config

    return multimodal_config(model_dir) is not None


def _checkpoint_names(model, model_dir) -> dict[str, torch.Tensor]:
    """The model's tensors (decoder and towers) by their names in the checkpoint at `model_dir`."""
    from g3n.checkpoint.reader import TensorIndex
    from g3n.model.towers import TOWER_PREFIX

    index, own = TensorIndex(Path(model_dir)), {}
    for name, tensor in model.state_dict().items():
        if name.startswith("towers."):
            key = TOWER_PREFIX + name.removeprefix("towers.")
        else:
            key = index.find(name.removeprefix("model.")) if name.startswith("model.") else None
        if key is not None and key in index.file_of:
            own[key] = tensor
    return own


def save_multimodal(model_dir, out_dir, dtype=torch.bfloat16, overwrite: bool = False, deltas=None, own=None) -> Path:
    """A multimodal checkpoint written whole in its own layout (transformers'
    Gemma3nForConditionalGeneration: decoder, towers, embedders), one tensor at a time: each from
    `own` (checkpoint name -> tensor, a model in memory) or read from the base, plus the adapter's
    delta (`deltas`: AdapterDeltas with towers), in `dtype`; the base's config (dtype updated),
    tokenizer and processor files. Appears complete or not at all."""
    from g3n.checkpoint.reader import TensorIndex
    from g3n.checkpoint.save import multimodal_config_dict, save_tensors

    model_dir, own = Path(model_dir), own or {}
    index = TensorIndex(model_dir)
    shapes = {n: tuple(index.handle(f).get_slice(n).get_shape()) for n, f in index.file_of.items()}
    if deltas is not None:
        deltas.check({_delta_name(n): s for n, s in shapes.items()}, model_dir)
    wrong = next((n for n, t in own.items() if tuple(t.shape) != shapes[n]), None)
    if wrong is not None:  # e.g. a MatFormer sub-model: it is not this checkpoint's model
        raise G3nError(f"{wrong} is {list(own[wrong].shape)} in the model but {list(shapes[wrong])} in {model_dir}; "
                       "a multimodal checkpoint is written whole only for a model of its own shapes")  # fmt: skip

    def tensors():
        for name, shape in shapes.items():
            t = own[name] if name in own else index.read(name, shape)
            if deltas is not None:
                t = deltas.merge(_delta_name(name), t)
            yield name, t.detach().to(dtype) if t.is_floating_point() else t

    with atomic_dir(out_dir, overwrite) as tmp:
        save_tensors(tensors(), None, tmp, dtype, config=multimodal_config_dict(model_dir, dtype))
        copy_tokenizer_files(model_dir, tmp)
    return Path(out_dir)


LANGUAGE_PREFIX = "model.language_model."
TOWER_MODULES = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def _delta_name(checkpoint_name: str) -> str:
    """AdapterDeltas' name of a checkpoint tensor: the decoder's as g3n names it, the towers' as is."""
    if checkpoint_name.startswith(LANGUAGE_PREFIX):
        return "model." + checkpoint_name.removeprefix(LANGUAGE_PREFIX)
    return checkpoint_name


def _tower_module(module: str) -> str | None:
    """The checkpoint name of a tower module an adapter tunes (g3n's `towers.X` or transformers'
    `model.X`), None for the decoder's."""
    for prefix in ("towers.", "model."):
        rest = module.removeprefix(prefix)
        if rest != module and rest.split(".")[0] in TOWER_MODULES:
            return "model." + rest
    return None


class AdapterDeltas:
    """A saved PEFT LoRA adapter as per-weight deltas (scale * B @ A; 1x1-kernel B of a convolution
    as a matrix), applied one tensor at a time, so exports can merge it while streaming weights (no
    model in memory). Plain LoRA only; the same arithmetic as PEFT's merge (tested against it
    through the GGUF and merged multimodal exports). With `towers`, adapters of the vision and audio
    towers too (by checkpoint name), else they are refused (a text-only export)."""

    def __init__(self, adapter_dir: str | Path, towers: bool = False):
        adapter_dir = self.dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        weights = adapter_dir / "adapter_model.safetensors"
        config = read_adapter_config(adapter_dir)  # the rule loading and every export share (DoRA refused)
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise G3nError(f"{config_path}: {key} is not supported when merging while streaming")
        r, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in read_adapter_weights(adapter_dir).items():
            module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise G3nError(f"{weights}: tensor {key!r} is not a LoRA A/B weight")
            tower = _tower_module(module)
            if tower is not None and towers:
                self.pairs.setdefault(f"{tower}.weight", {})[part[0]] = tensor
                continue
            if tower is not None or "layers." not in module:
                raise G3nError(
                    f"{weights}: the adapter tunes {tower.split('.')[1] if tower else module}; "
                    "exports write the text decoder, so only language-model adapters can be merged"
                )
            suffix = module[module.index("layers.") :]  # the same for text-only and multimodal layouts
            self.pairs.setdefault(f"model.{suffix}.weight", {})[part[0]] = tensor

    def check(self, shapes: dict, model_dir) -> None:
        """Refuse an adapter whose weights name tensors `model_dir` lacks, or do not fit their shapes
        (base weight (out, in, ...): A must be (r, in, ...), B (out, r, 1...)): an adapter of another model."""
        unknown = sorted(self.pairs.keys() - shapes.keys())
        if unknown:
            raise G3nError(f"{self.dir}: the adapter has weights for {unknown[0]}, which {model_dir} lacks: "
                           "an adapter of another model (pass its base with --model)")  # fmt: skip
        for name, pair in self.pairs.items():
            if pair.keys() != {"A", "B"}:
                raise G3nError(f"{self.dir}: the adapter has lora_{next(iter(pair))} but not its pair for {name}")
            shape = tuple(shapes[name])
            a, b = pair["A"].shape, pair["B"].shape
            want_b = (shape[0], a[0], *(1,) * (len(shape) - 2))
            for part, got, want in (("A", a, (a[0], *shape[1:])), ("B", b, want_b)):
                if tuple(got) != want:
                    key = f"{name.removesuffix('.weight')}.lora_{part}.weight"
                    raise G3nError(shape_error(self.dir, key, got, want, f"{model_dir}'s {name} {tuple(shapes[name])}"))

    def merge(self, name: str, rows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rows `start`.. of the base tensor `name` with their delta added, in float32; unchanged
        if the adapter does not touch `name`."""
        pair = self.pairs.get(name)
        if pair is None:
            return rows
        b = pair["B"][start : start + rows.shape[0]].float().flatten(1)
        return rows.float() + self.scale * (b @ pair["A"].float().flatten(1)).view(rows.shape)
