"""Write a MatFormer sub-model as a plain HF checkpoint, streaming shard by shard.

Each parent shard becomes one output shard. Tensors are read in row chunks of at most CHUNK_BYTES
with plain file reads (a memory map would count the whole file as resident) and written straight
into a safetensors file whose header is computed up front, so peak memory stays near one chunk
whatever the model's size. Vision/audio towers, the tokenizer and every other file are copied
unchanged. Everything is written into a temporary directory beside the output and renamed into
place at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from g3n.checkpoint.atomic import atomic_dir, check_export_target
from g3n.checkpoint.names import resolve_model_dir
from g3n.checkpoint.reader import DTYPE_SIZES, INDEX_FILE, SINGLE_FILE, TEXT_PREFIXES, ShardReader, TensorIndex
from g3n.config import TextConfig, read_text_config
from g3n.errors import G3nError
from g3n.export.llama_cpp_limits import llama_cpp_problems
from g3n.matformer.plan import Plan, Source, effective_parameters, load_plan, sub_config, tensor_source

CHUNK_BYTES = 64 * 2**20


@dataclass
class SliceResult:
    out_dir: Path
    plan: Plan
    config: TextConfig
    effective_params: int
    warnings: list[str]


def _sliced_shape(shape: list[int], piece: tuple[slice, ...]) -> list[int]:
    out = list(shape)
    for d, s in enumerate(piece):
        out[d] = len(range(*s.indices(shape[d])))
    return out


def _output_shape(shape: list[int], src: Source) -> list[int]:
    shapes = [_sliced_shape(shape, p) for p in src.pieces]
    out = list(shapes[0])
    if len(shapes) > 1:
        out[src.dim] = sum(s[src.dim] for s in shapes)
    return out


def _plan_text_tensor(suffix: str, parent: TextConfig, plan: Plan) -> tuple[str, Source] | None:
    """(output suffix, source) for a parent text tensor; None when it belongs to a skipped layer."""
    if suffix.startswith("layers."):
        layer = int(suffix.split(".")[1])
        if layer in plan.skip_layers:
            return None
        new = plan.kept_layers.index(layer)
        out = f"layers.{new}." + suffix.split(".", 2)[2]
        return out, tensor_source(out, parent, plan)
    return suffix, tensor_source(suffix, parent, plan)


def _write_shard(shard: ShardReader, dst_path: Path, entries: list[tuple[str, str, Source]]) -> None:
    """Write `entries` (output name, input name, source) from one input shard into one output shard."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for out_name, key, src in entries:
        dtype, shape = shard.info(key)
        out_shape = _output_shape(shape, src)
        nbytes = math.prod(out_shape) * DTYPE_SIZES[dtype]
        header[out_name] = {"dtype": dtype, "shape": out_shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dst_path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for out_name, key, src in entries:
            written = _stream_tensor(shard, key, src, out)
            start, end = header[out_name]["data_offsets"]
            if written != end - start:
                raise G3nError(f"{shard.path}: tensor '{key}' gave {written} bytes, expected {end - start}")


def _stream_tensor(shard: ShardReader, key: str, src: Source, out) -> int:
    """Write the source's slices of tensor `key` in row chunks; return the bytes written."""
    dtype, shape = shard.info(key)
    if not shape:
        return _write(shard.rows(key, 0, 1), out)
    row_bytes = max(1, math.prod(shape[1:]) * DTYPE_SIZES[dtype])
    step = max(1, CHUNK_BYTES // row_bytes)
    pieces = [p + (slice(None),) * (len(shape) - len(p)) for p in src.pieces]
    written = 0
    if src.dim == 0 or len(pieces) == 1:  # pieces follow each other row-wise
        for piece in pieces:
            rows = range(*piece[0].indices(shape[0]))
            for r in range(0, len(rows), step):
                chunk = shard.rows(key, rows.start + r, rows.start + min(r + step, len(rows)))
                written += _write(chunk[(slice(None),) + piece[1:]], out)
    else:  # pieces side by side: join each chunk of rows across them
        for r in range(0, shape[0], step):
            chunk = shard.rows(key, r, min(r + step, shape[0]))
            written += _write(torch.cat([chunk[(slice(None),) + p[1:]] for p in pieces], dim=src.dim), out)
    return written


def _write(t: torch.Tensor, out) -> int:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    out.write(data.tobytes())
    return data.nbytes


def _sub_config_json(raw: dict, child: TextConfig) -> dict:
    raw = json.loads(json.dumps(raw))
    text = raw["text_config"] if raw.get("model_type") == "gemma3n" else raw
    text.update(
        num_hidden_layers=child.num_hidden_layers,
        intermediate_size=child.intermediate_size,
        num_kv_shared_layers=child.num_kv_shared_layers,
        activation_sparsity_pattern=child.activation_sparsity_pattern,
        layer_types=child.layer_types,
    )
    return raw


def slice_checkpoint(model, plan_spec, out_dir, overwrite: bool = False, progress=None) -> SliceResult:
    """Write the sub-model `plan_spec` of checkpoint `model` to `out_dir` as an HF checkpoint."""
    model_dir = resolve_model_dir(model)
    parent = read_text_config(model_dir / "config.json")
    plan = load_plan(plan_spec, parent)
    child = sub_config(parent, plan)
    # --overwrite replaces only an earlier slice or export (a slice also copies the parent's other files)
    parent_files = [f.name for f in model_dir.iterdir() if f.is_file()]
    out = check_export_target(out_dir, "hf", overwrite, protect=(model_dir,), also=parent_files)

    index = TensorIndex(model_dir)
    prefix = next((p for p in TEXT_PREFIXES if any(k.startswith(p + "layers.") for k in index.file_of)), None)
    if prefix is None:
        raise G3nError(f"{model_dir}: no Gemma 3n text decoder layers found in the checkpoint")
    by_file: dict[Path, list[tuple[str, str, Source]]] = {}
    for key, path in index.file_of.items():
        if key.startswith(prefix) and not (prefix == "model." and key.startswith("model.language_model.")):
            planned = _plan_text_tensor(key[len(prefix) :], parent, plan)
            if planned is None:
                continue
            out_suffix, src = planned
            by_file.setdefault(path, []).append((prefix + out_suffix, prefix + src.name, src))
        else:
            by_file.setdefault(path, []).append((key, key, Source(key, [()])))
    for path in by_file:
        index.handle(path)  # a missing or corrupt shard fails here, before anything is written

    with atomic_dir(out, overwrite) as tmp:
        files = sorted(by_file)
        for i, path in enumerate(files):
            if progress:
                progress(i, len(files), path.name)
            shard = ShardReader(path)
            try:
                _write_shard(shard, tmp / path.name, sorted(by_file[path]))
            finally:
                shard.close()
        if len(files) > 1 or (model_dir / INDEX_FILE).is_file():
            weight_map = {name: path.name for path, entries in by_file.items() for name, _, _ in entries}
            total = sum((tmp / p.name).stat().st_size for p in files)
            index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
        raw = json.loads((model_dir / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(_sub_config_json(raw, child), indent=2) + "\n")
        for item in model_dir.iterdir():
            if item.name in ("config.json", INDEX_FILE, SINGLE_FILE) or item.suffix == ".safetensors":
                continue
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if progress:
            progress(len(files), len(files), "done")
    return SliceResult(out, plan, child, effective_parameters(child), llama_cpp_problems(child))
