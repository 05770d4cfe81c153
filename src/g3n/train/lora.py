"""LoRA on g3n's decoder through PEFT, saved in PEFT's adapter format, and merged back.

g3n's decoder uses transformers' module names, so PEFT's LoRA layers wrap the same modules and an
adapter saved here loads into transformers' `Gemma3nForCausalLM` with `PeftModel.from_pretrained`
(and the reverse).
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import G3nError
from ..model.save import TOKENIZER_FILES, atomic_dir, save_text_checkpoint, write_atomic

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the model's own names


def _peft():
    try:
        import peft
    except ImportError:
        raise G3nError("LoRA needs PEFT: pip install peft") from None
    return peft


# Module kinds per part, as regexes over g3n's module names (the towers sit under `towers.`).
TOWER_TARGETS = {
    ("image", "attention"): r"towers\.vision_tower\.timm_model\.blocks\.\d+\.\d+\.attn\.(query|key|value|output)\.proj",
    ("image", "mlp"): r"towers\.vision_tower\.timm_model\.(blocks\.\d+\.\d+|msfa\.ffn)\.(pw_exp|pw_proj)\.conv",
    ("audio", "attention"): r"towers\.audio_tower\.conformer\.\d+\.attention\.(attn\.(q_proj|k_proj|v_proj)|post)",
    (
        "audio",
        "mlp",
    ): r"towers\.audio_tower\.conformer\.\d+\.(ffw_layer_start|ffw_layer_end)\.(ffw_layer_1|ffw_layer_2)",
}


def target_modules(attention: bool = True, mlp: bool = True, parts=("text",)) -> str:
    """A PEFT regex selecting the attention and/or MLP projections of the chosen parts ("text":
    the language model, "image": the vision tower, "audio": the audio tower)."""
    names = (ATTENTION if attention else []) + (MLP if mlp else [])
    if not names:
        raise G3nError("LoRA needs at least one of the attention or MLP modules")
    kinds = [k for k, on in (("attention", attention), ("mlp", mlp)) if on]
    patterns = [rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"] if "text" in parts else []
    patterns += [TOWER_TARGETS[(p, k)] for p in parts if p != "text" for k in kinds]
    return patterns[0] if len(patterns) == 1 else "|".join(f"({p})" for p in patterns)


def add_lora(
    model,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.0,
    attention: bool = True,
    mlp: bool = True,
    parts=("text",),
):
    """Wrap the chosen projections with trainable LoRA adapters (base weights frozen)."""
    peft = _peft()
    targets = target_modules(attention, mlp, parts)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return _inject(model, config)


def _inject(model, config):
    """PEFT's adapters in `model` (base weights frozen), their products in the input's dtype."""
    model.requires_grad_(False)
    _peft().inject_adapter_in_model(config, model)
    model.lora_config = config
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:  # not the 4-bit or Conv2d variants: those keep PEFT's forward
            module.forward = types.MethodType(_forward_in_input_dtype, module)
    return model


def _forward_in_input_dtype(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's lora.Linear.forward with the adapter's two products in x's dtype when x is bfloat16.

    The training loop keeps adapters in float32 (master weights for AdamW), so PEFT casts x to
    float32 and adds a float32 product to the bfloat16 output: at E4B's MLP width a 2048-token row
    makes three float32 (2048 x 16384) tensors of 128 MiB each (the down projection's input kept
    for the backward pass, the gate's and up's adapter outputs and their gradients), which were a
    third of the layers' backward peak (bench/train_gpu.py --memory). Here the float32 weights
    are cast to bfloat16 for the products (autocast's rule; the cast's backward returns float32
    gradients), so nothing of MLP width is float32. float16 and float32 inputs take PEFT's own
    path: float16's adapter gradients need float32 products under loss scaling."""
    plain = not (args or kwargs or self.disable_adapters or self.merged) and x.dtype == torch.bfloat16
    if not plain or any(is_variant(self, name) for name in self.active_adapters):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    for name in self.active_adapters:
        if name in self.lora_A:
            a, b = self.lora_A[name].weight.to(x.dtype), self.lora_B[name].weight.to(x.dtype)
            result = result + F.linear(F.linear(self.lora_dropout[name](x), a), b) * self.scaling[name]
    return result


def is_variant(linear, name: str) -> bool:
    """Adapter `name` of a PEFT Linear is DoRA or another LoRA variant (PEFT's own forward only)."""
    variants, dora = getattr(linear, "lora_variant", None) or {}, getattr(linear, "use_dora", None) or {}
    return name in variants or bool(dora.get(name))


def save_adapter(model, out_dir: str | Path, base_model: str = "") -> Path:
    """adapter_model.safetensors + adapter_config.json, as PeftModel.save_pretrained writes them."""
    from safetensors.torch import save_file

    peft = _peft()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = model.lora_config.to_dict()
    config.update(base_model_name_or_path=base_model, task_type="CAUSAL_LM", peft_type="LORA")
    config["target_modules"] = model.lora_config.target_modules
    text = json.dumps(config, indent=2, default=lambda o: sorted(o) if isinstance(o, set) else str(o)) + "\n"
    write_atomic(out / "adapter_config.json", lambda p: p.write_text(text))
    return out


def load_adapter(model, adapter_dir: str | Path):
    """Add a saved PEFT LoRA adapter (ours or transformers + PEFT's) to a g3n model."""
    from safetensors.torch import load_file

    peft = _peft()
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise G3nError(f"{config_path}: not found (a PEFT adapter directory is expected)")
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    _inject(model, config)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        module, _, part = key.rpartition(".lora_")
        own = params.get(f"{module}.lora_{part.partition('.')[0]}.default.{part.partition('.')[2]}")
        if own is not None and own.shape != tensor.shape:
            raise G3nError(_shape_error(adapter_dir, key, tensor.shape, own.shape, module))
    result = peft.set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise G3nError(f"{adapter_dir}: adapter tensors that fit no module: {result.unexpected_keys[:3]}")
    return model


def _shape_error(adapter_dir, key, got, want, module) -> str:
    return (f"{adapter_dir}: adapter tensor {key} has shape {tuple(got)}, but {module} needs {tuple(want)}: "
            "an adapter of another model (pass its base with --model)")  # fmt: skip


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path), checked to
    resolve to a checkpoint; an error asking for --model when it is missing or does not resolve."""
    from ..model.load import resolve_model_dir

    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise G3nError(f"{config_path}: not found (a PEFT adapter directory is expected)")
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError) as e:
        raise G3nError(f"{config_path}: not a PEFT adapter config ({e})") from None
    if not base or not isinstance(base, str):
        raise G3nError(f"{config_path}: records no base_model_name_or_path; pass the base model with --model")
    try:
        resolve_model_dir(base)
    except G3nError as e:
        raise G3nError(
            f"{config_path}: base model {base!r} not found ({e}); pass the base model with --model"
        ) from None
    return base


@torch.no_grad()
def merge_lora(model):
    """Fold the adapters into the base weights and remove the LoRA layers (in place). Refused for
    4-bit weights (quant.refuse_merge says why); merge_checkpoint merges into the 16-bit originals."""
    from peft.tuners.lora import LoraLayer

    from ..model.quant import refuse_merge

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
    from ..model.quant import refuse_merge

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
    from ..model.load import TextTensors
    from ..model.save import save_tensors

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
                    raise G3nError(
                        _shape_error(self.dir, key, got, want, f"{model_dir}'s {name} {tuple(shapes[name])}")
                    )

    def merge(self, name: str, rows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rows `start`.. of the base tensor `name` with their delta added, in float32; unchanged
        if the adapter does not touch `name`."""
        pair = self.pairs.get(name)
        if pair is None:
            return rows
        b = pair["B"][start : start + rows.shape[0]].float()
        return rows.float() + self.scale * (b @ pair["A"].float())
