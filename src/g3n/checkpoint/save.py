"""Write a text decoder as an HF checkpoint (config.json + model.safetensors) that transformers loads.

Files are written under temporary names and renamed into place, so an interrupted save never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from g3n.checkpoint.atomic import TOKENIZER_FILES, write_atomic
from g3n.config import FULL, SLIDING, TextConfig


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


def save_text_checkpoint(model, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n"
    write_atomic(out / "config.json", lambda p: p.write_text(text))
    return out


SHARD_BYTES = 2 * 2**30


def save_tensors(
    items, cfg: TextConfig | None, out_dir: Path, dtype: torch.dtype, shard_bytes: int = SHARD_BYTES, config=None
) -> Path:
    """config.json + safetensors from (name, tensor) pairs, holding at most one shard in memory:
    model.safetensors when everything fits one shard, else model-0000i-of-0000N.safetensors and
    model.safetensors.index.json, as transformers writes them. config.json: `config` (a dict) when
    given, else the text decoder's of `cfg`. Write into a temporary directory (atomic_dir): shard
    files are renamed once their count is known."""
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
    config = config if config is not None else hf_config_dict(cfg, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def multimodal_config_dict(model_dir: str | Path, dtype: torch.dtype) -> dict:
    """A multimodal checkpoint's own config.json (Gemma3nForConditionalGeneration: text, vision and
    audio configs), its dtype set to the export's."""
    d = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    d["dtype"] = name
    for sub in (d, *(d.get(k) for k in ("text_config", "vision_config", "audio_config"))):
        for key in ("dtype", "torch_dtype"):
            if isinstance(sub, dict) and key in sub:
                sub[key] = name
    return d


# A multimodal checkpoint's processor files (image processor + audio feature extractor, processor
# settings, a processor's own chat template), copied beside the tokenizer files.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")


def write_tokenizer_files(model_dir: str | Path | None, out: Path) -> None:
    """Copy the checkpoint's tokenizer and processor files to `out`, with the chat template an export
    carries (tokenizer.export_chat_template) wherever transformers may read one: chat_template.jinja
    (the only place a processor looks, and the tokenizer's first choice) and any copy in
    tokenizer_config.json or a processor's chat_template.json."""
    from g3n.tokenizer import export_chat_template

    if model_dir is None:
        return
    model_dir, out = Path(model_dir), Path(out)
    for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    template = export_chat_template(model_dir)
    (out / "chat_template.jinja").write_text(template)
    for path in (out / "tokenizer_config.json", out / "chat_template.json"):
        d = json.loads(path.read_text()) if path.is_file() else {}
        if "chat_template" in d:
            named = d.get("chat_template")
            if isinstance(named, list):  # named templates: the default one replaced, the others kept
                others = [t for t in named if t.get("name") != "default"]
                d["chat_template"] = [{"name": "default", "template": template}, *others]
            else:
                d["chat_template"] = template
            path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
