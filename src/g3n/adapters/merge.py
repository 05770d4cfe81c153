"""Merging LoRA adapters into base weights: in memory (`merge_lora`), written out as a checkpoint
(`save_merged`), or streamed from a base checkpoint one tensor at a time (`merge_checkpoint`,
`AdapterDeltas`, which GGUF export uses too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from g3n.adapters.lora import PEFT_PREFIX, shape_error
from g3n.checkpoint.atomic import TOKENIZER_FILES, atomic_dir
from g3n.checkpoint.save import save_text_checkpoint
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
    appears complete or not at all."""
    with atomic_dir(out_dir, overwrite) as tmp:
        save_text_checkpoint(model, tmp, dtype)
        copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(out_dir)


def copy_tokenizer_files(tokenizer_dir: str | Path | None, out: Path) -> None:
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)


def merge_checkpoint(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype=torch.bfloat16, overwrite: bool = False
) -> Path:
    """The base checkpoint's own 16-bit text weights + the adapter's deltas (float32 sums), read,
    merged and written one tensor at a time (no model in memory; shards of SHARD_BYTES), with the
    tokenizer files: how a QLoRA run's adapter is merged, never into its 4-bit weights."""
    from g3n.checkpoint.save import save_tensors
    from g3n.model.load import TextTensors

    model_dir = Path(model_dir)
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


class AdapterDeltas:
    """A saved PEFT LoRA adapter as per-weight deltas (scale * B @ A), applied one tensor at a time,
    so exports can merge it while streaming weights (no model in memory). Plain LoRA only; the
    same arithmetic as PEFT's merge (tested against it through the GGUF export)."""

    def __init__(self, adapter_dir: str | Path):
        from safetensors.torch import load_file

        adapter_dir = self.dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        weights = adapter_dir / "adapter_model.safetensors"
        if not config_path.is_file() or not weights.is_file():
            raise G3nError(f"{adapter_dir}: not a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
        config = json.loads(config_path.read_text())
        for key in ("use_dora", "rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise G3nError(f"{config_path}: {key} is not supported when merging while streaming")
        r, alpha = config["r"], config["lora_alpha"]
        self.scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        self.pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(weights).items():
            module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise G3nError(f"{weights}: tensor {key!r} is not a LoRA A/B weight")
            if module.startswith("towers.") or "layers." not in module:
                raise G3nError(
                    f"{weights}: the adapter tunes {module.split('.')[1] if module.startswith('towers.') else module}; "
                    "exports write the text decoder, so only language-model adapters can be merged"
                )
            suffix = module[module.index("layers.") :]  # the same for text-only and multimodal layouts
            self.pairs.setdefault(f"model.{suffix}.weight", {})[part[0]] = tensor

    def check(self, shapes: dict, model_dir) -> None:
        """Refuse an adapter whose weights name tensors `model_dir` lacks, or do not fit their shapes
        (base weight (out, in): A must be (r, in), B (out, r)): an adapter of another model."""
        unknown = sorted(self.pairs.keys() - shapes.keys())
        if unknown:
            raise G3nError(f"{self.dir}: the adapter has weights for {unknown[0]}, which {model_dir} lacks: "
                           "an adapter of another model (pass its base with --model)")  # fmt: skip
        for name, pair in self.pairs.items():
            if pair.keys() != {"A", "B"}:
                raise G3nError(f"{self.dir}: the adapter has lora_{next(iter(pair))} but not its pair for {name}")
            out_features, in_features = tuple(shapes[name])
            a, b = pair["A"].shape, pair["B"].shape
            for part, got, want in (("A", a, (a[0], in_features)), ("B", b, (out_features, a[0]))):
                if tuple(got) != want:
                    key = f"{name.removesuffix('.weight')}.lora_{part}.weight"
                    raise G3nError(shape_error(self.dir, key, got, want, f"{model_dir}'s {name} {tuple(shapes[name])}"))

    def merge(self, name: str, rows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rows `start`.. of the base tensor `name` with their delta added, in float32; unchanged
        if the adapter does not touch `name`."""
        pair = self.pairs.get(name)
        if pair is None:
            return rows
        b = pair["B"][start : start + rows.shape[0]].float()
        return rows.float() + self.scale * (b @ pair["A"].float())
