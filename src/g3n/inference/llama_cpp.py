"""Run a GGUF file through llama.cpp (llama-cpp-python) behind the same chat interface as g3n's
own engine: Gemma's chat template (tokenizer.format_chat), exactly one BOS, Google's sampling
defaults (or whatever SamplingParams says), streamed text that stops at <end_of_turn> / eos."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from g3n.errors import G3nError
from g3n.extras import import_llama_cpp
from g3n.inference.sampling import SamplingParams
from g3n.tokenizer import format_chat, with_single_bos

DEFAULT_CONTEXT = 4096  # llama.cpp's KV cache is allocated for the whole context up front


def trained_context(path: Path) -> int | None:
    """The context length the GGUF file declares ({arch}.context_length), read from its header."""
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except Exception:  # noqa: BLE001 - not declared, or not a GGUF: llama.cpp will say what is wrong
        return None


class GGUFModel:
    """`n_ctx`: the context in tokens (default: DEFAULT_CONTEXT or the model's own, whichever is
    smaller; more than the model's own is refused)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None):
        path = Path(path).expanduser()
        if not path.is_file():
            raise G3nError(f"{path}: no such GGUF file")
        if n_ctx is not None and n_ctx < 1:
            raise G3nError(f"invalid context {n_ctx} (must be >= 1)")
        trained = trained_context(path)
        if n_ctx is not None and trained and n_ctx > trained:
            raise G3nError(f"{path}: context {n_ctx} is longer than the model's own ({trained})")
        self.path = path
        self.llm = self._open(path, n_ctx or min(DEFAULT_CONTEXT, trained or DEFAULT_CONTEXT), n_threads)
        self.n_ctx = self.llm.n_ctx()

    @staticmethod
    def _open(path: Path, n_ctx: int, n_threads: int | None):
        llama_cpp = import_llama_cpp("running a GGUF file")
        try:  # n_gpu_layers=-1 offloads everything when llama.cpp was built with a GPU backend
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=-1, n_threads=n_threads,
                                   verbose=False)  # fmt: skip
        except ValueError as e:
            raise G3nError(f"{path}: llama.cpp could not load it ({e})") from None

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
