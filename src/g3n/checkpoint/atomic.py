"""Atomic writes and export targets: files and directories appear complete or not at all, and an
export never overwrites the model, an adapter, or anything that is not an earlier export.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path

from g3n.errors import G3nError


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


# What an HF export writes (save_tensors / save_text_checkpoint + copy_tokenizer_files): the only
# files a directory may hold for --overwrite to replace it.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip
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
