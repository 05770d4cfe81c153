"""What --model names, as a checkpoint directory: a local directory, a Hugging Face id in the local
HF cache (downloaded when the network allows), or `tiny` (the model shipped in the package).
"""

from __future__ import annotations

import os
from pathlib import Path

from g3n.errors import G3nError

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"


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
