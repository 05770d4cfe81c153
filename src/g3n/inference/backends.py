"""One interface over the two ways g3n runs a model: its own PyTorch engine (HF checkpoints, `tiny`)
and llama.cpp (GGUF files). `g3n chat`, `g3n generate` and `g3n serve` only talk to this.

- `prepare(messages)`: (prompt ids, media tensors or None); content may hold HF-style image and
  audio parts (media.py); `encode(text)`: ids of plain text (one BOS either way).
- `stream(ids, params[, media])`: one prompt's reply as text pieces (the CLI).
- `run_batch(prompts, params, stopped)`: several prompts at once, each with its own sampling
  settings and seed, as `Piece(row, text, finish)` events; a row ends early when `stopped(row)`
  turns true (a server's disconnects and stop strings). `max_batch` says how many rows it takes:
  g3n's engine batches (`generate_rows`), llama-cpp-python runs one sequence at a time.
- `modalities`: what message content it takes: text, plus image/audio when the towers are loaded
  (`check_modalities` says clearly what is missing).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from g3n.errors import G3nError
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.inference.sampling import SamplingParams


@dataclass
class Piece:
    row: int
    text: str = ""  # new text of one generated token ("" while a character is incomplete)
    finish: str | None = None  # "stop" (end of turn) or "length" (max tokens); text is "" then


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


class TorchEngine:
    """g3n's own model and tokenizer; with a multimodal checkpoint, its vision/audio towers.
    `options`: how its engine decodes (DecodeOptions, e.g. --compile; default DecodeOptions())."""

    def __init__(self, model, tokenizer, name: str, max_batch: int = 8, model_dir=None, lazy_towers: bool = False,
                 options: DecodeOptions | None = None):  # fmt: skip
        self.options = DecodeOptions() if options is None else options
        if not isinstance(self.options, DecodeOptions):
            raise G3nError(f"options must be a DecodeOptions, not {self.options!r}")
        self.model, self.tok, self.name, self.max_batch = model, tokenizer, name, max_batch
        self.context_length = model.config.max_position_embeddings
        self.model_dir, self.lazy_towers, self.processor = model_dir, lazy_towers, None

    @property
    def modalities(self) -> frozenset[str]:
        towers = getattr(self.model, "towers", None)
        return frozenset({"text", *(towers.parts if towers is not None else ())})

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.tok.encode_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=True)

    def prepare(self, messages: list[dict]) -> tuple[list[int], dict | None]:
        """(prompt ids, media tensors or None) for messages whose content may hold image/audio
        parts. With `lazy_towers` (g3n chat) a missing tower is loaded the first time its input
        appears; otherwise (the server, whose worker thread is using the model) that is an error."""
        kinds = media_kinds(messages)
        if not kinds:
            return self.tok.encode_chat(messages), None
        from g3n.media import MediaProcessor

        if not kinds <= self.modalities:
            if not self.lazy_towers or self.model_dir is None:
                check_modalities(self, kinds)
            from g3n.model.towers import add_towers

            add_towers(self.model, self.model_dir, kinds)
        if self.processor is None:
            self.processor = MediaProcessor(self.model_dir)
        return self.processor(self.tok, messages)

    def stream(self, ids: list[int], params: SamplingParams, media: dict | None = None) -> Iterator[str]:
        from g3n.inference import generate  # looked up per call, so tests can wrap generate.stream_text

        return generate.stream_text(self.model, self.tok, ids, params, media, options=self.options)

    def run_batch(self, prompts, params, stopped: Callable[[int], bool] | None = None, media=None) -> Iterator[Piece]:
        """`media`: one batch-wide media dict (media.py's tensors for the prompts in order) or None."""
        from g3n.inference.generate import TextStreamer, generate_rows

        streamers = [TextStreamer(self.tok) for _ in prompts]
        limits = [min(p.max_new_tokens, self.context_length - len(x)) for p, x in zip(params, prompts)]
        stops = self.tok.stop_ids
        steps = generate_rows(self.model, prompts, params, stops, self.tok.pad_id, stopped, media, self.options)
        for step, tokens in enumerate(steps):
            for row, tok in enumerate(tokens):
                if tok is None:
                    continue
                if tok in stops:
                    yield Piece(row, finish="stop")
                    continue
                yield Piece(row, streamers[row].push(tok))
                if step + 1 >= limits[row]:
                    yield Piece(row, finish="length")


class GGUFEngine:
    """A GGUF file run by llama.cpp through llama-cpp-python (one sequence at a time, text only)."""

    modalities = frozenset({"text"})
    max_batch = 1

    def __init__(self, path: str, name: str, context: int | None = None):
        from g3n.inference.llama_cpp import GGUFModel

        self.gguf, self.name = GGUFModel(path, context), name
        self.context_length = self.gguf.n_ctx
        self.encode_chat, self.encode = self.gguf.encode_chat, self.gguf.encode

    def stream(self, ids: list[int], params: SamplingParams, media: dict | None = None) -> Iterator[str]:
        if media:
            raise G3nError("a GGUF file runs text only here")
        return self.gguf.stream(ids, params)

    def prepare(self, messages: list[dict]) -> tuple[list[int], None]:
        check_modalities(self, media_kinds(messages))
        return self.gguf.encode_chat(messages), None

    def run_batch(self, prompts, params, stopped: Callable[[int], bool] | None = None, media=None) -> Iterator[Piece]:
        if media:
            raise G3nError("a GGUF file runs text only here")
        for row, (ids, p) in enumerate(zip(prompts, params)):
            chunks = self.gguf.chunks(ids, p)
            try:
                for text, finish in chunks:
                    if stopped is not None and stopped(row):
                        break
                    if text:
                        yield Piece(row, text)
                    if finish:
                        yield Piece(row, finish="stop" if finish == "stop" else "length")
            finally:
                chunks.close()  # ends llama.cpp's generation there


def media_kinds(messages: list[dict]) -> set[str]:
    """Which of image/audio the messages' content parts hold."""
    kinds = {p.get("type") for m in messages if isinstance(m.get("content"), list) for p in m["content"]}
    return kinds & {"image", "audio"}


def check_modalities(engine, wanted: set[str]) -> None:
    """Raise G3nError naming what the loaded model cannot take (images, audio)."""
    missing = set(wanted) - {"text"} - set(engine.modalities)
    if not missing:
        return
    what = " and ".join(sorted({"image": "images", "audio": "audio"}.get(m, m) for m in missing))
    if isinstance(engine, GGUFEngine):
        raise G3nError(f"model {engine.name} is a GGUF file run by llama.cpp, which takes text only here; {what} "
                       "need an HF Gemma 3n checkpoint (Gemma3nForConditionalGeneration)")  # fmt: skip
    from g3n.model.towers import checkpoint_modalities

    tower = "a vision tower" if "image" in missing else "an audio tower"
    if getattr(engine, "model_dir", None) is not None and set(missing) <= set(checkpoint_modalities(engine.model_dir)):
        raise G3nError(f"model {engine.name} was loaded without {tower} (--text-only, or the multimodal extra "
                       f"is not installed: pip install 'g3n[multimodal]'); {what} need it")  # fmt: skip
    raise G3nError(f"model {engine.name} was loaded without {tower}; {what} need a "
                   "Gemma3nForConditionalGeneration checkpoint")  # fmt: skip


def model_name(model: str) -> str:
    """What clients call the model: 'tiny', a checkpoint directory's name, a GGUF file's stem."""
    path = Path(str(model)).expanduser()
    if str(model).lower().endswith(".gguf"):
        return path.stem
    return path.name if path.exists() else str(model)


def load_engine(model: str = "tiny", dtype="auto", device=None, matformer=None, adapter=None, max_batch: int = 8,
                modalities=(), lazy_towers: bool = True, load_in_4bit: bool = False, context: int | None = None,
                options: DecodeOptions | None = None):  # fmt: skip
    """Open MODEL (checkpoint directory, cached HF id, 'tiny' or .gguf file) as an engine.

    modalities: towers to load now ("image", "audio"), or "all" for every tower the checkpoint has;
    lazy_towers: load others when their input first appears (the CLI; not the server);
    load_in_4bit: NF4 attention/MLP weights, the per-layer table in CPU memory; an adapter then
    runs beside them, unmerged; context: llama.cpp's context for a GGUF file (inference/llama_cpp.py);
    options: how g3n's engine decodes (DecodeOptions: --compile and the kernels), g3n's engine only."""
    start = time.perf_counter()
    name = model_name(model)
    if str(model).lower().endswith(".gguf"):
        if matformer:
            raise G3nError("--matformer slices checkpoints; a GGUF file is already one fixed model")
        if adapter:
            raise G3nError("--adapter merges into a checkpoint; for a GGUF, export it with the adapter merged "
                           "(g3n export --adapter DIR --format gguf)")  # fmt: skip
        if modalities and modalities != "all":
            raise G3nError("a GGUF file runs text only here; pass the checkpoint directory for images and audio")
        if load_in_4bit:
            raise G3nError("--load-in-4bit quantizes a checkpoint; a GGUF file has its own quantization "
                           "(g3n export --format gguf --quant)")  # fmt: skip
        if options is not None and options.compile is not CompileMode.OFF:
            raise G3nError("--compile compiles g3n's decode step; a GGUF file runs in llama.cpp")
        engine = GGUFEngine(model, name, context)
        _say(f"[g3n] loaded {model} with llama.cpp in {time.perf_counter() - start:.1f}s")
        return engine
    if context is not None:
        raise G3nError("--context sets llama.cpp's context for a .gguf file; a checkpoint runs to its own context")
    from g3n import load
    from g3n.checkpoint.names import resolve_model_dir
    from g3n.model.towers import checkpoint_modalities

    model_dir = resolve_model_dir(model)
    kinds = checkpoint_modalities(model_dir) if modalities == "all" else list(modalities)
    if modalities == "all" and kinds:
        from g3n.model.towers import require_transformers

        try:
            require_transformers()
        except G3nError as e:  # "all" means: what this checkpoint and this install can do
            _say(f"[g3n] serving text only: {e}")
            kinds = []
    # 4-bit: the per-layer table (as large as E2B's 4-bit weights together) stays in CPU memory
    m, tok = load(model, dtype=dtype, device=device, matformer=matformer, modalities=kinds, load_in_4bit=load_in_4bit,
                  ple_device="cpu" if load_in_4bit else None)  # fmt: skip
    extra = f", MatFormer plan {matformer}" if matformer else ""
    if load_in_4bit:
        extra += ", attention/MLP weights in 4 bits (NF4)"
    if kinds:
        extra += f", {' and '.join(sorted(kinds))} tower{'s' if len(kinds) > 1 else ''}"
    if adapter:
        from g3n.adapters.lora import load_adapter
        from g3n.adapters.merge import merge_lora

        load_adapter(m, adapter)
        if load_in_4bit:  # merging would round the adapter's change away (quant.refuse_merge)
            extra += f", adapter {adapter} applied beside the 4-bit weights"
        else:
            merge_lora(m)
            extra += f", adapter {adapter} merged"
    _say(f"[g3n] loaded {model} ({m.config.num_hidden_layers} layers{extra}, {m.dtype}, {m.device})"
         f" in {time.perf_counter() - start:.1f}s")  # fmt: skip
    return TorchEngine(m.eval(), tok, name, max_batch, model_dir, lazy_towers, options)
