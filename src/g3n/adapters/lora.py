"""LoRA on g3n's decoder through PEFT, saved in PEFT's adapter format, and merged back.

g3n's decoder uses transformers' module names, so PEFT's LoRA layers wrap the same modules and an
adapter saved here loads into transformers' `Gemma3nForCausalLM` with `PeftModel.from_pretrained`
(and the reverse).
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from g3n.checkpoint.atomic import write_atomic
from g3n.errors import G3nError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the model's own names


def import_bitsandbytes_quietly() -> None:
    """Import bitsandbytes (when installed) without the line its CPU backend logs on CPUs with
    AVX-512 BF16: it tries a kernel from the Hugging Face Hub at import and reports the failure
    (about trust_remote_code), which means nothing to a g3n user; its 4-bit layers run without it.
    PEFT imports bitsandbytes whenever it is installed, so this runs before PEFT and training."""
    import importlib.util
    import logging
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hub = logging.Filter()
    hub.filter = lambda record: "kernels-community" not in record.getMessage()
    logger.addFilter(hub)
    try:
        with contextlib.suppress(Exception):  # a broken install is reported where 4-bit weights need it
            import bitsandbytes  # noqa: F401
    finally:
        logger.removeFilter(hub)


def _peft():
    import_bitsandbytes_quietly()
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


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json, checked to be an adapter g3n can use: the one rule for loading,
    merging and every export (HF, GGUF): plain LoRA; DoRA and PEFT's other methods are refused."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise G3nError(f"{config_path}: not found (a PEFT adapter directory is expected)")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise G3nError(f"{config_path}: not a PEFT adapter config ({e})") from None
    if not isinstance(config, dict):
        raise G3nError(f"{config_path}: not a PEFT adapter config (expected a JSON object)")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise G3nError(f"{config_path}: peft_type {kind!r}: g3n loads and merges LoRA adapters only")
    if config.get("use_dora"):
        raise G3nError(f"{config_path}: use_dora is not supported: g3n loads, merges and exports plain LoRA "
                       "adapters only (train without DoRA)")  # fmt: skip
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise G3nError(f"{config_path}: {key} must be a number > 0, got {value!r}")
    return config


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors's tensors; a missing, truncated or foreign file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise G3nError(f"{path}: not found (a PEFT adapter directory holds adapter_model.safetensors)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise G3nError(
            f"{path}: cannot read the adapter weights ({e}); the file is truncated or not safetensors"
        ) from None


def load_adapter(model, adapter_dir: str | Path):
    """Add a saved PEFT LoRA adapter (ours or transformers + PEFT's) to a g3n model."""
    peft = _peft()
    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    config = peft.LoraConfig.from_pretrained(str(adapter_dir))
    _inject(model, config)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        module, _, part = key.rpartition(".lora_")
        own = params.get(f"{module}.lora_{part.partition('.')[0]}.default.{part.partition('.')[2]}")
        if own is not None and own.shape != tensor.shape:
            raise G3nError(shape_error(adapter_dir, key, tensor.shape, own.shape, module))
    result = peft.set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise G3nError(f"{adapter_dir}: adapter tensors that fit no module: {result.unexpected_keys[:3]}")
    return model


def shape_error(adapter_dir, key, got, want, module) -> str:
    return (f"{adapter_dir}: adapter tensor {key} has shape {tuple(got)}, but {module} needs {tuple(want)}: "
            "an adapter of another model (pass its base with --model)")  # fmt: skip


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path), checked to
    resolve to a checkpoint; an error asking for --model when it is missing or does not resolve."""
    from g3n.checkpoint.names import resolve_model_dir

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
