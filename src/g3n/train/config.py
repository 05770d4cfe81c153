"""Fine-tuning settings: one dataclass, read from YAML, overridable with --set key=value."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from g3n.config import read_yaml
from g3n.errors import G3nError


@dataclass
class TrainConfig:
    # model and method
    model: str = "tiny"  # checkpoint directory, cached HF id, or tiny
    lora: bool = True  # false: full fine-tuning
    load_in_4bit: bool = False  # QLoRA: attention/MLP base weights as NF4 (bitsandbytes)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    finetune_language_layers: bool = True
    finetune_vision_layers: bool = False  # LoRA/full on the vision tower (multimodal checkpoints)
    finetune_audio_layers: bool = False  # LoRA/full on the audio tower (multimodal checkpoints)
    # data
    train_data: list[str] = field(default_factory=list)  # JSONL / JSON / CSV / Parquet files
    eval_data: list[str] = field(default_factory=list)  # empty: hold out eval_fraction of train_data
    eval_fraction: float = 0.05
    responses_only: bool = True  # loss on model turns only
    max_length: int = 1024
    packing: bool = True
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping
    # optimisation
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"  # linear, cosine or constant (after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 2
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping
    optim: str = "adamw"  # adamw, or adamw_8bit (bitsandbytes, CUDA)
    dtype: str = "auto"
    device: str | None = None
    gradient_checkpointing: bool | str = "offload"  # true, false or offload (layer inputs wait in CPU memory)
    compile: bool | str = "auto"  # decoder layers through torch.compile; auto: on one CUDA GPU
    fused_lora_mlp: bool = False  # the LoRA MLP's own backward: less memory, somewhat slower (train/lora_mlp.py)
    ple_on_cpu: bool = True  # per-layer embedding table stays in CPU memory
    seed: int = 0
    # output
    output_dir: str = "runs/g3n"
    save_steps: int = 50
    eval_steps: int = 50
    save_merged: bool | None = None  # write the model (HF checkpoint) to output_dir/merged; None: for full only

    def __post_init__(self):
        for name in ("train_data", "eval_data"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            if isinstance(getattr(self, name), list):
                setattr(self, name, [_home(f) for f in getattr(self, name)])
        self.output_dir, self.model = _home(self.output_dir), _home(self.model)
        for name, f in FIELDS.items():
            setattr(self, name, _yaml_float(f.type, getattr(self, name)))
            _check_type(name, f.type, getattr(self, name))
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise G3nError(f"config: {name} must be a finite number, got {value!r}")
        choices = {"lr_scheduler": ("linear", "cosine", "constant"), "optim": ("adamw", "adamw_8bit"),
                   "dtype": ("auto", "float32", "bfloat16", "float16"),
                   "gradient_checkpointing": (True, False, "offload"), "compile": (True, False, "auto")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise G3nError(f"config: {name} {getattr(self, name)!r}: use {', '.join(map(str, allowed)).lower()}")
        if self.fused_lora_mlp and not self.lora:
            raise G3nError("config: fused_lora_mlp needs lora: true (it fuses the LoRA adapters' MLP)")
        checks = {  # name: (valid, the allowed range)
            "max_length": (self.max_length > 1, ">= 2"), "batch_size": (self.batch_size >= 1, ">= 1"),
            "grad_accum": (self.grad_accum >= 1, ">= 1"), "learning_rate": (self.learning_rate > 0, "> 0"),
            "eval_fraction": (0 <= self.eval_fraction < 1, ">= 0 and < 1"), "lora_r": (self.lora_r >= 1, ">= 1"),
            "save_steps": (self.save_steps >= 1, ">= 1"), "eval_steps": (self.eval_steps >= 1, ">= 1"),
            "max_steps": (self.max_steps >= 0, ">= 0 (0: use epochs)"), "epochs": (self.epochs > 0, "> 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "max_grad_norm": (self.max_grad_norm is None or self.max_grad_norm >= 0, ">= 0 (0 or null: no clipping)"),
            "lora_alpha": (self.lora_alpha > 0, "> 0"), "lora_dropout": (0 <= self.lora_dropout < 1, ">= 0 and < 1"),
            "seed": (0 <= self.seed < 2**63, ">= 0 and < 2**63"),
        }  # fmt: skip
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise G3nError(f"config: invalid {name} {getattr(self, name)!r}: must be {allowed}")
        if self.device is not None:
            from g3n.model.load import parse_device

            try:
                parse_device(self.device)
            except G3nError as e:
                raise G3nError(f"config: invalid device: {e}") from None
        if not self.parts:
            raise G3nError(
                "config: finetune_language_layers, finetune_vision_layers and finetune_audio_layers are all false, "
                "so nothing would be trained"
            )
        if self.load_in_4bit and not self.lora:
            raise G3nError(
                "config: load_in_4bit stores the base weights in 4 bits, which cannot be trained; use it with "
                "lora: true (QLoRA)"
            )
        if not self.lora and {"image", "audio"} & set(self.parts):
            raise G3nError(
                "config: the vision/audio tower is tuned with LoRA only (lora: true); full fine-tuning covers "
                "the decoder"
            )

    @property
    def parts(self) -> list[str]:
        """What is tuned: "text" (the decoder), "image" (vision tower), "audio" (audio tower)."""
        switches = (self.finetune_language_layers, self.finetune_vision_layers, self.finetune_audio_layers)
        return [p for p, on in zip(("text", "image", "audio"), switches, strict=True) if on]

    @property
    def writes_model(self) -> bool:
        """Whether the run ends by writing an HF checkpoint to output_dir/merged: when asked, and by
        default for full fine-tuning, whose checkpoints are otherwise only resumable state."""
        return self.save_merged if self.save_merged is not None else not self.lora

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _home(path):
    """`~` expanded once, where a path enters the settings: every later use sees one directory."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _yaml_float(annotation: str, value):
    """YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string; a float setting takes it as the number."""
    if annotation.startswith("float") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(name: str, annotation: str, value) -> None:
    """YAML and --set give typed values; say which setting got the wrong kind of value."""
    if annotation == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif annotation == "bool | str":
        ok = isinstance(value, (bool, str))
    elif annotation.endswith(" | None") and value is None:
        ok = True
    elif annotation.endswith(" | None"):
        return _check_type(name, annotation.removesuffix(" | None"), value)
    else:
        ok = isinstance(value, _TYPES[annotation]) and (annotation == "bool" or not isinstance(value, bool))
    if not ok:
        raise G3nError(
            f"config: {name} must be {annotation.replace('list[str]', 'a list of file names')}, got {value!r}"
        )


HELP = {
    "model": "checkpoint directory (relative to the config file), cached HF id, or tiny",
    "lora": "true: LoRA adapters (PEFT format); false: full fine-tuning",
    "load_in_4bit": "QLoRA: the decoder layers' attention and MLP weights stored as NF4 (bitsandbytes: "
    "pip install 'g3n[qlora]'); embeddings, norms, the per-layer table and small projections stay 16-bit; "
    "save_merged merges into the checkpoint's 16-bit weights",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / r)", "lora_dropout": "LoRA dropout",
    "finetune_attention_modules": "LoRA on q/k/v/o projections",
    "finetune_mlp_modules": "LoRA on gate/up/down projections",
    "finetune_language_layers": "tune the language model",
    "finetune_vision_layers": "tune the vision tower (MobileNetV5: attention and 1x1 conv projections)",
    "finetune_audio_layers": "tune the audio tower (conformer attention and feed-forward layers)",
    "train_data": "JSONL/JSON/CSV/Parquet files or datasets directories: messages, ShareGPT, Alpaca or text records",
    "eval_data": "held-out files (empty: hold out eval_fraction of train_data)",
    "eval_fraction": "share of train_data held out for eval when eval_data is empty",
    "responses_only": "loss on model turns only (false: on every token)",
    "max_length": "tokens per row; longer samples are cut and counted",
    "packing": "pack several samples per row (no attention across them)",
    "skip_bad": "skip malformed records (counted and listed) instead of stopping at the first",
    "learning_rate": "AdamW learning rate", "lr_scheduler": "linear, cosine or constant (after warmup)",
    "warmup_steps": "linear warmup steps", "weight_decay": "AdamW weight decay",
    "epochs": "passes over the data (ignored when max_steps > 0)", "max_steps": "optimizer steps (0: use epochs)",
    "batch_size": "rows per micro-batch (per process under torchrun)", "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "clip the gradient norm to this (0 or null: no clipping)", "optim": "adamw, or adamw_8bit (bitsandbytes on CUDA)",
    "dtype": "auto, float32, bfloat16 or float16 (float16: loss scaling, float32 LoRA weights)",
    "device": "cpu, cuda (default: cuda when present)",
    "gradient_checkpointing": "recompute each layer in the backward pass instead of storing its activations; "
    "offload (default): also keep each layer's input in pinned CPU memory until then (less GPU memory at "
    "about the same speed)",
    "compile": "run the decoder layers and the loss through torch.compile (faster steps, after a one-off compile "
    "of 30-70 s); auto: on when training 16-bit weights on one CUDA GPU",
    "fused_lora_mlp": "LoRA: run each MLP as one function whose backward pass holds half the (tokens x MLP width) "
    "buffers (a lower memory peak) but runs outside the compiled graphs (fewer tokens/s)",
    "ple_on_cpu": "keep the per-layer embedding table in CPU memory (only the batch's rows move to the GPU; "
    "frozen in full fine-tuning)",
    "seed": "seed for data order and initialisation",
    "output_dir": "where checkpoints, metrics.jsonl, loss.png and the adapter go (relative to the current directory)",
    "save_steps": "checkpoint every N steps", "eval_steps": "eval every N steps",
    "save_merged": "write the model as an HF checkpoint (the run's weight dtype, tokenizer files included) to output_dir/merged "
    "at the end: LoRA merged into the base (default false); full fine-tuning's only loadable output (default true)",
}  # fmt: skip


def settings_help() -> str:
    lines = []
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {name} = {default!r}\n      {HELP[name]}")
    return "\n".join(lines)


def _check_keys(data: dict, where: str) -> None:
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise G3nError(f"{where}: unknown setting {key!r}{hint}")


def _model_beside(model: str, base: Path) -> str:
    """A relative model path in a config file is relative to the file, as data paths are: one
    written as a path (./x, ../x) or found there. tiny, HF ids and absolute paths stay as they are."""
    model = _home(model)
    path = Path(model)
    if model == "tiny" or path.is_absolute():
        return model
    if model.startswith(("./", "../", ".\\", "..\\")) or (base / path).exists():
        return str((base / path).resolve())
    return model


def load_train_config(
    path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
) -> TrainConfig:
    """Settings from a YAML file (relative data and model paths resolved against it), then key=value
    overrides (relative to the current directory)."""
    import yaml

    data = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise G3nError(f"{path}: config file not found")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise G3nError(f"{path}: expected a mapping of settings")
        _check_keys(loaded, str(path))
        for key in ("train_data", "eval_data"):
            if key in loaded:
                files = [loaded[key]] if isinstance(loaded[key], str) else loaded[key]
                if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                    raise G3nError(f"{path}: {key} must be a file name or a list of them, got {loaded[key]!r}")
                files = [_home(f) for f in files]
                loaded[key] = [str((path.parent / f).resolve()) if not Path(f).is_absolute() else f for f in files]
        if isinstance(loaded.get("model"), str):
            loaded["model"] = _model_beside(loaded["model"], path.parent)
        data.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise G3nError(f"--set {item!r}: expected key=value")
        _check_keys({key: None}, "--set")
        data[key] = yaml.safe_load(value) if value else ""
    try:
        return TrainConfig(**data)
    except TypeError as e:
        raise G3nError(f"config: {e}") from None
