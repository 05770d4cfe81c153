"""Atomic writes and export targets: files and directories appear complete or not at all, and an
export never overwrites the model, an adapter, or anything that is not an earlier export.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import shutil
import socket
from pathlib import Path

from g3n.errors import G3nError

# A write in progress goes to `.NAME.g3n-partial-PID` beside NAME (hidden, named for what it is and
# whose it is); earlier versions wrote `.NAME.tmp-PID`. One left by a killed process is removed by
# the next write of NAME (or the next run into the same output_dir) once its PID is gone.
PARTIAL = "g3n-partial"
TEMP_PATTERN = re.compile(rf"\.(?P<name>.+)\.(?:{PARTIAL}|tmp)-(?P<pid>\d+)(?:\.[A-Za-z0-9]+)?")


def temp_path(path: Path, suffix: str = "") -> Path:
    """Where this process writes `path` before renaming it into place."""
    return path.with_name(f".{path.name}.{PARTIAL}-{os.getpid()}{suffix}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (one of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temps(directory: Path, name: str | None = None) -> list[str]:
    """Remove the temporaries in `directory` (of `name` only, when given) whose process is gone;
    returns their names."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_PATTERN.fullmatch(entry.name)
        if not m or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry.name)
    return removed


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to path (a full disk or a read-only directory is
    a one-line error, and nothing half-written stays)."""
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error(path: Path, e: OSError) -> Exception:
    """A G3nError for the write problems a user fixes (space, permissions); anything else as it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return G3nError(f"{path}: no space left on the device while writing it (nothing half-written was kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return G3nError(f"{path}: cannot write there ({e.strerror})")
    return e


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `out`; when the block succeeds it replaces `out` by a
    rename, so an interrupted write never leaves a partial directory under the final name."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise G3nError(f"{out}: output directory exists (pass --overwrite to replace it)")
    remove_stale_temps(out.parent, out.name)
    tmp = temp_path(out)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOCK_FILE = ".g3n-lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace")


@contextlib.contextmanager
def dir_lock(directory: Path, what: str = "a run"):
    """Hold `directory` for this process while it writes there: another g3n process asking for it
    is refused with the holder's PID. The lock (flock on LOCK_FILE, which names the holder) ends
    with its process, so a killed run's lock is simply taken over."""
    try:
        import fcntl
    except ImportError:  # Windows: the PID alone tells
        fcntl = None
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(directory, e) from None
    path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            if fcntl is None:
                raise OSError("no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd).strip() or "another process"
            os.close(fd)
            raise G3nError(f"{directory}: {holder} is writing {what} there ({path}); wait for it to end, "
                           "stop it, or choose another directory") from None  # fmt: skip
        except OSError:  # a filesystem without flock: the PID alone tells
            holder = _holder(fd)
            m = re.match(r"g3n process (\d+) on (\S+)", holder)
            if m and m[2] == socket.gethostname() and int(m[1]) != os.getpid() and pid_alive(int(m[1])):
                os.close(fd)
                raise G3nError(f"{directory}: {holder.strip()} is writing {what} there ({path})") from None
        try:  # the holder removes the file as it ends: lock the one that is there now
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"g3n process {os.getpid()} on {socket.gethostname()}\n".encode())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the lock goes, so nobody locks a file on its way out
        os.close(fd)


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
