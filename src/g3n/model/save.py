"""Write a text decoder as an HF checkpoint (config.json + model.safetensors) that transformers loads.

Files are written under temporary names and renamed into place, so an interrupted save never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import FULL, SLIDING, TextConfig
from ..errors import G3nError


def hf_config_dict(cfg: TextConfig, dtype: torch.dtype) -> dict:
    """A `gemma3n_text` config.json as transformers writes it."""
    d = cfg.to_dict()
    theta, local = d.pop("rope_theta"), d.pop("rope_local_base_freq")
    d.pop("torch_dtype")
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(
        model_type="gemma3n_text",
        architectures=["Gemma3nForCausalLM"],
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": theta},
            SLIDING: {"rope_type": "default", "rope_theta": local},
        },
        tie_word_embeddings=True,
        dtype=dtype_name,
        torch_dtype=dtype_name,
    )
    return d


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `out`; when the block succeeds it replaces `out` by a
    rename, so an interrupted write never leaves a partial directory under the final name."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise G3nError(f"{out}: output directory exists (pass --overwrite to replace it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip
# What an HF export writes (save_tensors / save_text_checkpoint + copy_tokenizer_files): the only
# files a directory may hold for --overwrite to replace it.
HF_EXPORT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)
GGUF_MAGIC = b"GGUF"


def is_or_contains(outer: Path, inner: Path) -> bool:
    """Whether directory `outer` is `inner` or one of its ancestors: by resolved path, and for
    existing paths also by file identity (case-insensitive filesystems, bind mounts)."""
    outer, inner = Path(outer).resolve(), Path(inner).resolve()
    if outer == inner or outer in inner.parents:
        return True
    if not outer.exists():
        return False
    return any(a.exists() and os.path.samefile(outer, a) for a in (inner, *inner.parents))


def check_export_target(out: str | Path, fmt: str, overwrite: bool = False, protect=(), also=()) -> Path:
    """Refuse an output path an export must not write: one that exists (without `overwrite`), that
    is or contains a directory in `protect` (the model, the adapter), or, for `overwrite`, that is
    not an earlier export of the same kind: a directory holding only HF_EXPORT_FILES or the names
    in `also` (`fmt` "hf"), or a GGUF file ("gguf")."""
    out = Path(out).expanduser()
    for p in protect:
        if p is not None and is_or_contains(out, Path(p)):
            raise G3nError(f"{out}: is or contains {p}, which this export reads; choose another --out")
    if is_or_contains(out, Path.cwd()):
        raise G3nError(f"{out}: is or contains the current directory; choose an --out of its own")
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise G3nError(f"{out}: {'output directory ' if fmt == 'hf' else ''}exists (pass --overwrite to replace it)")
    if fmt == "hf":
        if not out.is_dir() or out.is_symlink():
            raise G3nError(
                f"{out}: not a directory; an HF export writes a directory (a .gguf file needs --format gguf)"
            )
        for f in sorted(out.iterdir()):
            if not f.is_file() or not any(fnmatch.fnmatch(f.name, pattern) for pattern in (*HF_EXPORT_FILES, *also)):
                raise G3nError(f"{out}: holds {f.name}, which an HF export does not write; "
                               "--overwrite only replaces an earlier export (choose another --out)")  # fmt: skip
    else:
        if not out.is_file():
            raise G3nError(f"{out}: not a file; a GGUF export writes one file (e.g. --out {out / 'model.gguf'})")
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise G3nError(f"{out}: not a GGUF file; --overwrite only replaces an earlier export "
                               "(choose another --out)")  # fmt: skip
    return out


def save_text_checkpoint(model, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n"
    write_atomic(out / "config.json", lambda p: p.write_text(text))
    return out


SHARD_BYTES = 2 * 2**30


def save_tensors(items, cfg: TextConfig, out_dir: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> Path:
    """config.json + safetensors from (name, tensor) pairs, holding at most one shard in memory:
    model.safetensors when everything fits one shard, else model-0000i-of-0000N.safetensors and
    model.safetensors.index.json, as transformers writes them. Write into a temporary directory
    (atomic_dir): shard files are renamed once their count is known."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, shard, size, total = [], {}, 0, 0

    def flush():
        nonlocal shard, size
        path = out / f".shard-{len(parts)}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        parts.append((path, list(shard)))
        shard, size = {}, 0

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor.detach().to("cpu").contiguous()
        size, total = size + nbytes, total + nbytes
    if shard or not parts:
        flush()
    if len(parts) == 1:
        os.replace(parts[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, names) in enumerate(parts, 1):
            final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            os.replace(path, out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    return out
