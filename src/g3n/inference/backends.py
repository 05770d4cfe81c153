"""One interface over the two ways g3n runs a model: its own PyTorch engine (HF checkpoints, `tiny`)
and llama.cpp (GGUF files). `g3n chat`, `g3n generate` and `g3n serve` only talk to this.

- `prepare(messages)`: (prompt ids, media tensors or None); content may hold HF-style image and
  audio parts (media.py); `encode(text)`: ids of plain text (one BOS either way).
- `stream(ids, params[, media])`: one prompt's reply as text pieces (the CLI).
- `submit(ids, params, media=, logit_bias=, logprobs=, grammar=, adapter=)` -> handle, `step()` -> the `Piece`s
  produced, `cancel(handle)`: continuous batching for a server. g3n's engine runs up to
  `max_batch` requests together, each with its own sampling settings and seed, a new one joining
  at the next step (inference/engine.py); llama-cpp-python runs one sequence at a time.
- `modalities`: what message content it takes: text, plus image/audio when the towers are loaded
  (`check_modalities` says clearly what is missing).
"""

from __future__ import annotations

import collections
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from g3n.errors import G3nError
from g3n.inference.options import CompileMode, DecodeOptions
from g3n.inference.sampling import SamplingParams


@dataclass
class Piece:
    handle: int
    text: str = ""  # new text of one generated token ("" while a character is incomplete)
    finish: str | None = None  # "stop" (end of turn) or "length" (max tokens); text is "" then
    logprob: float | None = None  # of the token, when asked (g3n's engine)
    top: list[tuple[str, float]] | None = None  # the most likely alternatives' text and log-probabilities
    token: str | None = None  # the token's own text, with logprobs


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


class TorchEngine:
    """g3n's own model and tokenizer; with a multimodal checkpoint, its vision/audio towers.
    `options`: how its engine decodes (DecodeOptions, e.g. --compile; default DecodeOptions())."""

    grammars = True  # decodes under a grammar (response_format)

    def __init__(self, model, tokenizer, name: str, max_batch: int = 8, model_dir=None, lazy_towers: bool = False,
                 options: DecodeOptions | None = None):  # fmt: skip
        self.options = DecodeOptions() if options is None else options
        if not isinstance(self.options, DecodeOptions):
            raise G3nError(f"options must be a DecodeOptions, not {self.options!r}")
        self.model, self.tok, self.name, self.max_batch = model, tokenizer, name, max_batch
        self.context_length = model.config.max_position_embeddings
        self._engine = None
        self._streamers: dict = {}  # handle -> TextStreamer of a submitted request
        self._ended: list[int] = []  # handles that end before their first token (max_tokens 0)
        self._grammars: dict = {}  # handle -> GrammarProcessor of a request with a response format
        self._vocab = None  # llguidance's view of the tokenizer, built at the first response format
        self.model_dir, self.lazy_towers, self.processor = model_dir, lazy_towers, None
        self.adapter_names: list[str] = []  # LoRA adapters served per row beside the base model

    def add_adapter(self, name: str, adapter_dir) -> None:
        """Serve a PEFT LoRA adapter beside the base model under `name` (requests pick it by name)."""
        if name == self.name or name in self.adapter_names:
            raise G3nError(f"adapter name {name!r} is taken (the model's own name, or another adapter's)")
        self.engine.add_adapter(name, adapter_dir)
        self.adapter_names.append(name)

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

    @property
    def engine(self):
        """This backend's persistent engine (inference/engine.py), made on first use: the CLI's
        replies and the server's requests all run on it (one thread at a time)."""
        if self._engine is None:
            from g3n.inference.engine import Engine

            self._engine = Engine(self.model, self.max_batch, self.options)
        return self._engine

    def stream(self, ids: list[int], params: SamplingParams, media: dict | None = None) -> Iterator[str]:
        from g3n.inference import generate  # looked up per call, so tests can wrap generate.stream_text

        return generate.stream_text(self.model, self.tok, ids, params, media, engine=self.engine)

    def submit(self, ids: list[int], params: SamplingParams, media: dict | None = None,
               logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
               grammar: str | None = None, adapter: str | None = None) -> int:  # fmt: skip
        from g3n.inference.engine import Request
        from g3n.inference.generate import TextStreamer

        processor = None
        if grammar is not None:
            processor = self._grammar(grammar, len(ids), params.max_new_tokens)
        request = Request(list(ids), params, frozenset(self.tok.stop_ids), media, logit_bias, logprobs, processor,
                          adapter)  # fmt: skip
        handle = self.engine.add(request)
        if params.max_new_tokens == 0:  # the engine ends it at once, without a token
            self._ended.append(handle)
        else:
            self._streamers[handle] = TextStreamer(self.tok)
            if processor is not None:
                self._grammars[handle] = processor
        return handle

    def _grammar(self, grammar: str, prompt_len: int, max_new: int):
        """The row's grammar processor (inference/grammar.py); the vocabulary is built once."""
        from g3n.inference import grammar as grammars

        if self._vocab is None:
            self._vocab = grammars.vocabulary(self.tok, self.model.config.vocab_size)
        budget = min(max_new, (self.engine.fixed_len or self.engine.context) - prompt_len)
        return grammars.GrammarProcessor(self._vocab, grammar, self.tok.stop_ids, budget)

    def cancel(self, handle: int) -> None:
        self.engine.cancel(handle)
        self._streamers.pop(handle, None)
        self._grammars.pop(handle, None)

    def step(self) -> list[Piece]:
        out = [Piece(h, finish="length") for h in self._ended]
        self._ended.clear()
        for t in self.engine.step():
            streamer = self._streamers.get(t.handle)
            if streamer is None:
                continue
            grammar = self._grammars.get(t.handle)
            if t.finish:
                self._streamers.pop(t.handle)
                self._grammars.pop(t.handle, None)
            if t.finish == "stop":  # a value closed early for max_tokens is cut short, though whole
                early = grammar is not None and grammar.closed_early
                out.append(Piece(t.handle, finish="length" if early else "stop"))
                continue
            piece = Piece(t.handle, streamer.push(t.token), t.finish)
            if t.logprob is not None:
                piece.logprob, piece.token = t.logprob, self.tok.decode([t.token])
                piece.top = [(self.tok.decode([i]), lp) for i, lp in t.top]
            out.append(piece)
        return out


class GGUFEngine:
    """A GGUF file run by llama.cpp through llama-cpp-python (one sequence at a time, text only)."""

    modalities = frozenset({"text"})
    max_batch = 1
    grammars = False
    adapter_names: tuple[str, ...] = ()  # served adapters: none (llama.cpp runs the GGUF as it is)

    def __init__(self, path: str, name: str, context: int | None = None):
        from g3n.inference.llama_cpp import GGUFModel

        self.gguf, self.name = GGUFModel(path, context), name
        self.context_length = self.gguf.n_ctx
        self._queue: collections.deque = collections.deque()  # (handle, ids, params) not started
        self._active = None  # (handle, its chunks) while llama.cpp runs it
        self._handles = itertools.count()
        self.encode_chat, self.encode = self.gguf.encode_chat, self.gguf.encode

    def stream(self, ids: list[int], params: SamplingParams, media: dict | None = None) -> Iterator[str]:
        if media:
            raise G3nError("a GGUF file runs text only here")
        return self.gguf.stream(ids, params)

    def prepare(self, messages: list[dict]) -> tuple[list[int], None]:
        check_modalities(self, media_kinds(messages))
        return self.gguf.encode_chat(messages), None

    def submit(self, ids: list[int], params: SamplingParams, media: dict | None = None,
               logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
               grammar: str | None = None, adapter: str | None = None) -> int:  # fmt: skip
        if media:
            raise G3nError("a GGUF file runs text only here")
        asked = {"logit_bias": logit_bias, "logprobs": logprobs is not None, "response_format": grammar is not None,
                 "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty}  # fmt: skip
        if named := [name for name, value in asked.items() if value]:
            raise G3nError(f"{' and '.join(named)} need{'s' * (len(named) == 1)} g3n's engine (an HF checkpoint); "
                           "a GGUF file runs in llama.cpp")  # fmt: skip
        handle = next(self._handles)
        self._queue.append((handle, ids, params))
        return handle

    def cancel(self, handle: int) -> None:
        self._queue = collections.deque(q for q in self._queue if q[0] != handle)
        if self._active is not None and self._active[0] == handle:
            self._active[1].close()  # ends llama.cpp's generation there
            self._active = None

    def step(self) -> list[Piece]:
        """The next piece of the one sequence llama.cpp runs (the next queued one when it ends)."""
        if self._active is None:
            if not self._queue:
                return []
            handle, ids, params = self._queue.popleft()
            self._active = (handle, self.gguf.chunks(ids, params))
        handle, chunks = self._active
        text, finish = next(chunks, ("", "length"))
        out = [Piece(handle, text)] if text else []
        if finish:
            out.append(Piece(handle, finish="stop" if finish == "stop" else "length"))
            chunks.close()
            self._active = None
        return out


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
                options: DecodeOptions | None = None, ple_on_gpu: bool = False):  # fmt: skip
    """Open MODEL (checkpoint directory, cached HF id, 'tiny' or .gguf file) as an engine.

    modalities: towers to load now ("image", "audio"), or "all" for every tower the checkpoint has;
    lazy_towers: load others when their input first appears (the CLI; not the server);
    load_in_4bit: NF4 attention/MLP weights, the per-layer table in CPU memory; an adapter then
    runs beside them, unmerged; context: llama.cpp's context for a GGUF file (inference/llama_cpp.py);
    options: how g3n's engine decodes (DecodeOptions: --compile and the kernels), g3n's engine only;
    ple_on_gpu: the per-layer embedding table on the accelerator (default: in CPU memory, which the
    engine's steps read over the bus at the same speed)."""
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
    m, tok = load(model, dtype=dtype, device=device, matformer=matformer, modalities=kinds, load_in_4bit=load_in_4bit,
                  ple_device=None if ple_on_gpu else "cpu")  # fmt: skip
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
