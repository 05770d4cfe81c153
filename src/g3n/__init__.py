"""g3n: run, fine-tune, slice and export Google's Gemma 3n models on your own hardware."""

__version__ = "0.1.0"

from g3n.errors import G3nError


def load(
    path_or_name="tiny", dtype=None, device=None, ple_device=None, matformer=None, modalities=(), load_in_4bit=False
):
    """Load `(model, tokenizer)` from a checkpoint directory, a cached HF id, or 'tiny'.

    `model(input_ids)` returns logits (batch x seq x vocab). dtype: None (automatic), "float32",
    "bfloat16" or "float16" (or a torch.dtype); device: None (CUDA when present), "cpu", "cuda".
    matformer: a MatFormer plan (name or file) to run that sub-model from the parent's weights.
    modalities: ("image", "audio") or a subset: also load those towers (a multimodal checkpoint).
    load_in_4bit: the decoder layers' attention and MLP weights stored as NF4 (bitsandbytes; QLoRA);
    pair it with ple_device="cpu" on a GPU (the per-layer table is as large as E2B's 4-bit weights).
    """
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.model.load import load_model
    from g3n.tokenizer import Tokenizer

    model_dir = resolve_model_dir(path_or_name)
    model = load_model(
        model_dir,
        dtype=dtype,
        device=device,
        ple_device=ple_device,
        matformer=matformer,
        modalities=modalities,
        load_in_4bit=load_in_4bit,
    )
    tokenizer = Tokenizer.from_dir(model_dir)
    n_tokens, vocab = tokenizer.sp.get_piece_size(), model.config.vocab_size
    if n_tokens > vocab:
        raise G3nError(f"{model_dir}: tokenizer.model has {n_tokens} tokens but config.json's vocab_size is {vocab}")
    return model, tokenizer


# The public API beside `load`, imported on first use (so `import g3n` stays light).
_PUBLIC = {
    "SamplingParams": "g3n.inference.sampling",
    "generate": "g3n.inference.generate",
    "stream_text": "g3n.inference.generate",
    "DecodeOptions": "g3n.inference.options",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'g3n' has no attribute {name!r}")


__all__ = ["DecodeOptions", "G3nError", "SamplingParams", "__version__", "generate", "load", "stream_text"]
