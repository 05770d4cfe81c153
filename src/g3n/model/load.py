"""Find a checkpoint, read its text weights by name, and build the decoder.

A model is named by a local checkpoint directory, a Hugging Face id already in the local HF cache
(downloaded when the network allows), or `tiny` (the model shipped in the package). Only the text
decoder's tensors are read: vision and audio weights stay on disk.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import TextConfig, read_text_config
from ..errors import G3nError
from ..matformer import load_plan, sub_config, tensor_source
from .text import Gemma3nForCausalLM, RotaryEmbedding

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Where transformers keeps the text decoder: multimodal checkpoints first, then text-only ones.
TEXT_PREFIXES = ("model.language_model.", "model.")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """Turn what a user typed after --model into a checkpoint directory."""
    name = str(name)
    if name == "tiny":
        return TINY_DIR
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        raise G3nError(f"{name}: a GGUF file runs with g3n chat/generate only; this needs an HF checkpoint directory")
    if path.is_dir():
        return path
    if path.exists():
        raise G3nError(f"{name}: not a directory (expected a checkpoint directory with config.json)")
    if _looks_like_hub_id(name):
        return _from_hf_cache(name)
    raise G3nError(f"{name}: no such directory, and not a Hugging Face model id or 'tiny'")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _from_hf_cache(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face model, downloading it only when not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: try the network below
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise G3nError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all mean "could not download"
        raise G3nError(f"{repo_id}: not in the local Hugging Face cache and could not be downloaded ({e})") from None


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


TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_SIZES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}


class ShardReader:
    """Reads row ranges of a safetensors file with plain reads (no memory map), so memory use is
    what is asked for, not the file's size."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            (n,) = struct.unpack("<Q", self.file.read(8))
            self.header = json.loads(self.file.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            self.file.close()
            raise G3nError(f"{path}: not a safetensors file ({e})") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def close(self):
        self.file.close()

    def info(self, key: str) -> tuple[str, list[int]]:
        meta = self.header[key]
        return meta["dtype"], meta["shape"]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        dtype, shape = self.info(key)
        row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[dtype] if shape else DTYPE_SIZES[dtype]
        offset = self.base + self.header[key]["data_offsets"][0] + start * row_bytes
        data = bytearray(os.pread(self.file.fileno(), (stop - start) * row_bytes, offset))
        if len(data) != (stop - start) * row_bytes:
            raise G3nError(f"{self.path}: tensor '{key}' is cut short, truncated file?")
        t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return t.view(TORCH_DTYPES[dtype]).reshape([stop - start, *shape[1:]] if shape else [])


class TensorIndex:
    """Which safetensors file holds which tensor, from the index file or the single file's header."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise G3nError(f"{index}: not a valid safetensors index ({e})") from None
            self.file_of = {name: model_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            self.file_of = {name: single for name in self._open(single).keys()}  # noqa: SIM118 - not a dict
        else:
            raise G3nError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise G3nError(f"{path}: shard listed in the index is missing")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise G3nError(f"{path}: cannot read safetensors file, truncated or corrupt? ({e})") from None

    def handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def find(self, suffix: str) -> str | None:
        """The checkpoint key of the text-model tensor `suffix` (e.g. 'layers.0.mlp.up_proj.weight')."""
        for prefix in TEXT_PREFIXES:
            if prefix + suffix in self.file_of:
                return prefix + suffix
        return None

    def open_slice(self, key: str, expected_shape):
        """The lazy safetensors slice of `key`, after checking its shape against the config's."""
        path = self.file_of[key]
        f = self.handle(path)
        if key not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise G3nError(f"{path}: tensor '{key}' listed in the index is missing from the file")
        sl = f.get_slice(key)
        shape = tuple(sl.get_shape())
        if shape != tuple(expected_shape):
            raise G3nError(f"{path}: tensor '{key}' has shape {list(shape)}, expected {list(expected_shape)}")
        return sl

    def read(self, key: str, expected_shape, pieces=((),), dim: int = 0) -> torch.Tensor:
        """The tensor `key`, or only the given slices of it joined on `dim` (nothing else is read)."""
        sl = self.open_slice(key, expected_shape)
        try:
            parts = [sl[piece] if piece else sl[:] for piece in pieces]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise G3nError(f"{self.file_of[key]}: cannot read tensor '{key}', truncated or corrupt? ({e})") from None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


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
        from .quant import is_quantized_name, linear_4bit, require_backend

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
        from .towers import load_towers

        model.towers = load_towers(model_dir, tensors.index, modalities, dtype, device)
    model.requires_grad_(False)
    return model.eval()
