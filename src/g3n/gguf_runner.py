"""Run a GGUF file through llama.cpp (llama-cpp-python) behind the same chat interface as g3n's
own engine: Gemma's chat template (tokenizer.format_chat), exactly one BOS, Google's sampling
defaults (or whatever SamplingParams says), streamed text that stops at <end_of_turn> / eos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .errors import G3nError
from .generate import SamplingParams
from .gguf_export import import_llama_cpp
from .tokenizer import format_chat, with_single_bos

DEFAULT_CONTEXT = 4096


class GGUFModel:
    def __init__(self, path: str | Path, n_ctx: int = DEFAULT_CONTEXT, n_threads: int | None = None):
        path = Path(path).expanduser()
        if not path.is_file():
            raise G3nError(f"{path}: no such GGUF file")
        llama_cpp = import_llama_cpp("running a GGUF file")
        try:  # n_gpu_layers=-1 offloads everything when llama.cpp was built with a GPU backend
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=-1, n_threads=n_threads,
                                       verbose=False)  # fmt: skip
        except ValueError as e:
            raise G3nError(f"{path}: llama.cpp could not load it ({e})") from None
        self.path = path
        self.n_ctx = n_ctx

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = format_chat(messages)
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        return with_single_bos(ids, self.llm.token_bos())

    def encode(self, text: str) -> list[int]:
        return with_single_bos(
            self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), self.llm.token_bos()
        )

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Pieces of the reply's text as llama.cpp generates them."""
        for text, _ in self.chunks(prompt_ids, params):
            if text:
                yield text

    def chunks(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[tuple[str, str | None]]:
        """(text, finish reason) per llama.cpp chunk; the reason ("stop", "length") comes on the last.
        Closing the iterator ends the generation."""
        room = self.n_ctx - len(prompt_ids)
        if room <= 0:
            raise G3nError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.n_ctx}")
        self.llm.reset()
        chunks = self.llm.create_completion(
            prompt_ids,
            max_tokens=min(params.max_new_tokens, room),
            temperature=0.0 if params.greedy else params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            repeat_penalty=params.repetition_penalty,
            # llama.cpp takes a uint32 seed where 0xFFFFFFFF means "random": fold any int into the rest
            seed=None if params.seed is None else params.seed % 0xFFFFFFFF,
            stop=["<end_of_turn>"],
            stream=True,
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            yield choice["text"], choice.get("finish_reason")
