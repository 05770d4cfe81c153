"""Write a text decoder as an HF checkpoint (config.json + model.safetensors) that transformers loads.

Files are written under temporary names and renamed into place, so an interrupted save never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
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
    out = Path(out)
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


def save_text_checkpoint(model, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n"
    write_atomic(out / "config.json", lambda p: p.write_text(text))
    return out
