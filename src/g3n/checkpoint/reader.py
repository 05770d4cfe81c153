"""Reading safetensors checkpoints by tensor name, single-file or sharded, without loading whole files."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from g3n.errors import G3nError

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


# Where transformers keeps the text decoder: multimodal checkpoints first, then text-only ones.
TEXT_PREFIXES = ("model.language_model.", "model.")


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
