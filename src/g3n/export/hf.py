"""Exports of a (fine-tuned) model for other tools.

`export_hf`: the base model with a LoRA adapter folded in (or unchanged), written as an HF
checkpoint that transformers and `g3n` load: config.json, safetensors, tokenizer files and a chat
template that takes content parts. A text-only checkpoint gives the text decoder
(`Gemma3nForCausalLM`); a multimodal one is written whole in its own layout
(`Gemma3nForConditionalGeneration`: towers, embedders, processor files), streamed one tensor at a
time, with adapters of the towers merged too. GGUF and Ollama exports live in export/gguf.py and
export/ollama.py.
"""

from __future__ import annotations

from pathlib import Path

from g3n.checkpoint.atomic import check_export_target
from g3n.checkpoint.names import resolve_model_dir
from g3n.checkpoint.save import PROCESSOR_FILES
from g3n.errors import G3nError
from g3n.model.load import parse_dtype


def export_hf(model: str, out: str | Path, adapter: str | Path | None = None, dtype: str = "bfloat16",
              overwrite: bool = False) -> Path:  # fmt: skip
    """Merge `adapter` (a PEFT LoRA directory) into `model` and write the result to `out`."""
    from g3n.adapters.merge import AdapterDeltas, save_multimodal
    from g3n.model.towers import multimodal_config

    model_dir = resolve_model_dir(model)
    # before the (slow) load: only an earlier export is replaced, never the model, the adapter or other files
    out = check_export_target(out, "hf", overwrite, protect=(model_dir, adapter), also=PROCESSOR_FILES)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        raise G3nError("export needs a concrete dtype: float32, bfloat16 or float16")
    if multimodal_config(model_dir) is not None:  # streamed: no model in memory
        deltas = AdapterDeltas(adapter, towers=True) if adapter is not None else None
        return save_multimodal(model_dir, out, torch_dtype, overwrite, deltas=deltas)
    from g3n import load
    from g3n.adapters.lora import load_adapter
    from g3n.adapters.merge import save_merged

    # load()'s default dtype on the CPU: float32 for small models (an exact merge), the checkpoint's
    # own dtype for big ones.
    m, _ = load(model_dir, dtype=None, device="cpu")
    if adapter is not None:
        load_adapter(m, adapter)
    return save_merged(m, out, tokenizer_dir=model_dir, dtype=torch_dtype, overwrite=overwrite)
