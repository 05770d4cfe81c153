"""Find a checkpoint, read its text weights by name, and build the decoder.

A model is named by a local checkpoint directory, a Hugging Face id already in the local HF cache
(downloaded when the network allows), or `tiny` (the model shipped in the package). Only the text
decoder's tensors are read: vision and audio weights stay on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from g3n.checkpoint.names import resolve_model_dir
from g3n.checkpoint.reader import ShardReader, TensorIndex
from g3n.config import TextConfig, read_text_config
from g3n.errors import G3nError
from g3n.matformer.plan import load_plan, sub_config, tensor_source
from g3n.model.text import Gemma3nForCausalLM, RotaryEmbedding

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise G3nError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16, auto") from None


def default_dtype(cfg: TextConfig, device: torch.device, n_params: int) -> torch.dtype:
    """bfloat16 on GPUs that have it (float16 otherwise); float32 on CPU for small models."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if n_params * 4 <= 8 * 2**30:
        return torch.float32
    return DTYPES.get(str(cfg.torch_dtype), torch.bfloat16)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device: str | torch.device) -> torch.device:
    """A device name as torch reads it; a clear error for one it does not (torch's is a traceback)."""
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise G3nError(f"{device!r} is not a device (cpu, cuda or cuda:N)") from None


class TextTensors:
    """The text decoder's parameters in a checkpoint, by g3n's parameter names, read one at a time
    in the checkpoint's dtype (with a MatFormer plan: only the sub-model's slices). Shared by
    `load_model` and the streaming GGUF export."""

    def __init__(self, model_dir: Path, matformer=None):
        self.parent = read_text_config(model_dir / "config.json")
        self.plan = load_plan(matformer, self.parent) if matformer is not None else None
        self.config = sub_config(self.parent, self.plan) if self.plan is not None else self.parent
        with torch.device("meta"):
            self.meta = Gemma3nForCausalLM(self.config)
        self.shapes = {name: p.shape for name, p in self.meta.named_parameters()}
        self._parent_shapes = self.shapes
        if self.plan is not None:
            with torch.device("meta"):
                self._parent_shapes = {n: p.shape for n, p in Gemma3nForCausalLM(self.parent).named_parameters()}
        self.sources = {n: tensor_source(n.removeprefix("model."), self.parent, self.plan) for n in self.shapes}
        self.index = TensorIndex(model_dir)
        self._readers: dict[Path, ShardReader] = {}
        missing = ["model." + src.name for src in self.sources.values() if self.index.find(src.name) is None]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise G3nError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")

    def row_chunks(self, name: str, rows: int):
        """The whole tensor `name` in blocks of `rows` rows, read with plain reads (no memory map),
        so memory holds one block at a time (whole checkpoints only, not MatFormer slices)."""
        if self.plan is not None:
            raise ValueError("row_chunks reads whole tensors; it does not apply MatFormer plans")
        key = self.index.find(self.sources[name].name)
        self.index.open_slice(key, self.shapes[name])  # checks presence and shape
        path = self.index.file_of[key]
        if path not in self._readers:
            self._readers[path] = ShardReader(path)
        reader, n = self._readers[path], self.shapes[name][0] if len(self.shapes[name]) else 1
        for start in range(0, n, rows):
            yield reader.rows(key, start, min(start + rows, n))

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def read(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        return self.index.read(self.index.find(src.name), self._parent_shapes["model." + src.name], src.pieces, src.dim)


def load_model(
    path_or_name: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    ple_device: str | torch.device | None = None,
    matformer=None,
    modalities=(),
    load_in_4bit: bool = False,
) -> Gemma3nForCausalLM:
    """Build the text decoder from a checkpoint, reading only the text weights.

    `ple_device` places the per-layer embedding table elsewhere (e.g. "cpu" beside a GPU model);
    by default it sits with the rest of the model. `matformer` (a plan name, plan file or Plan)
    builds that MatFormer sub-model straight from the parent's weights, reading only its slices.
    `modalities` ("image", "audio") also loads those towers (model.towers), and nothing else of them.
    `load_in_4bit`: the layers' attention and MLP projections stored as NF4 (quant.py), each one
    quantized on `device` as it is read; `dtype` is then the compute dtype and that of the rest.
    """
    model_dir = resolve_model_dir(path_or_name)
    if not model_dir.is_dir():
        raise G3nError(f"{model_dir}: no such directory")
    device = parse_device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise G3nError(f"device {device} requested but CUDA is not available")
    tensors = TextTensors(model_dir, matformer)
    cfg, model = tensors.config, tensors.meta
    dtype = parse_dtype(dtype) or default_dtype(cfg, device, sum(s.numel() for s in tensors.shapes.values()))
    ple_name = "model.embed_tokens_per_layer.weight"
    ple_device = parse_device(ple_device) if ple_device is not None else device

    if load_in_4bit:
        from g3n.model.quant import is_quantized_name, linear_4bit, require_backend

        require_backend(device)
    state = {}
    for name in tensors.shapes:
        if load_in_4bit and is_quantized_name(name):  # one matrix at a time, 16-bit only while quantized
            module, _, child = name.removesuffix(".weight").rpartition(".")
            setattr(model.get_submodule(module), child, linear_4bit(tensors.read(name), dtype, device))
            continue
        state[name] = tensors.read(name).to(dtype=dtype, device=ple_device if name == ple_name else device)
    result = model.load_state_dict(state, assign=True, strict=not load_in_4bit)
    if load_in_4bit:
        missing = [k for k in result.missing_keys if not is_quantized_name(k)]
        if missing or result.unexpected_keys:  # a bug, not a user error: the names come from the model
            raise RuntimeError(f"4-bit load: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        model.is_loaded_in_4bit = True  # PEFT wraps bitsandbytes layers with its 4-bit LoRA layers when set
    model.model.rotary_emb = RotaryEmbedding(cfg).to(device)
    if modalities:
        from g3n.model.towers import load_towers

        model.towers = load_towers(model_dir, tensors.index, modalities, dtype, device)
    model.requires_grad_(False)
    return model.eval()
