"""Token generation through the model's persistent engine (inference/engine.py): Google's
recommended sampling, batches of prompts, streaming text.

Defaults are Google's recommendation for Gemma 3n: temperature 1.0, top_k 64, top_p 0.95,
min_p 0.0, repetition penalty 1.0 (off). The logits pass the filters in transformers' order
(repetition penalty, temperature, top-k, top-p, min-p), so the same settings mean the same thing.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import torch

from g3n.errors import G3nError
from g3n.inference.engine import Engine, Request, Token
from g3n.inference.options import DecodeOptions
from g3n.inference.sampling import SamplingParams


class _Engines:
    """The engines a model has served, by (options, module identities): the next call reuses
    the cache, graphs and compiled code. A copy of the model starts with none (an engine holds
    CUDA graphs and a cache that belong to the original)."""

    def __init__(self):
        self.by_key: dict = {}

    def __deepcopy__(self, memo):
        return _Engines()


def engine_for(model, options: DecodeOptions | None = None, slots: int = 1) -> Engine:
    """The model's persistent engine for `options` with at least `slots` rows (made on first use;
    a model whose modules were replaced since, e.g. by an adapter, gets a new one)."""
    options = DecodeOptions() if options is None else options
    if not isinstance(options, DecodeOptions):
        raise G3nError(f"options must be a DecodeOptions, not {options!r}")
    engines = model.__dict__.setdefault("_g3n_engines", _Engines())
    modules = hash(tuple(map(id, model.modules())))
    key = (options, modules)
    engine = engines.by_key.get(key)
    if engine is None or engine.slots < slots:
        engines.by_key.pop(key, None)
        if len(engines.by_key) >= 2:  # memory stays bounded: the oldest goes
            engines.by_key.pop(next(iter(engines.by_key)))
        engine = engines.by_key[key] = Engine(model, slots, options)
    return engine


def _per_row(params: SamplingParams, rows: int) -> list[SamplingParams]:
    """`params` for each of `rows` rows sharing it: the seed itself for the first row (so a batch's
    first row equals the prompt alone), seeds derived from it for the others (so equal prompts
    differ)."""
    seed = params.seed
    return [params if seed is None or row == 0 else dataclasses.replace(params, seed=hash((seed, row)) & (2**63 - 1))
            for row in range(rows)]  # fmt: skip


def _run_rows(model, requests: list[Request], options, stopped=None) -> Iterator[list[Token | None]]:
    """Run `requests` on the model's engine; yield, per step, each row's next Token (None for rows
    that ended). `stopped(row)`, asked before each step, ends a row there."""
    engine = engine_for(model, options, len(requests))
    handles = [engine.add(r) for r in requests]
    row_of = {h: i for i, h in enumerate(handles)}
    queues = [collections.deque() for _ in handles]
    done = [r.params.max_new_tokens == 0 for r in requests]
    try:
        while not all(done):
            if stopped is not None:
                for row, handle in enumerate(handles):
                    if not done[row] and stopped(row):
                        engine.cancel(handle)
                        done[row] = True
                        queues[row].clear()
                if all(done):
                    return
            for t in engine.step():
                if t.handle in row_of:
                    queues[row_of[t.handle]].append(t)
            while not all(done) and all(d or q for d, q in zip(done, queues)):
                out = [None if d else q.popleft() for d, q in zip(done, queues)]
                for row, t in enumerate(out):
                    if t is not None and t.finish:
                        done[row] = True
                yield out
    finally:
        for handle in handles:
            engine.cancel(handle)


def _requests(prompts, params: list[SamplingParams], stop_ids, media, logprobs=None) -> list[Request]:
    """The engine's requests (Engine.add checks each prompt)."""
    if not prompts:
        raise G3nError("every prompt needs at least one token")
    if len(params) != len(prompts):
        raise G3nError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    if media and len(prompts) > 1:
        raise G3nError("images and audio are generated one prompt at a time")
    stops = frozenset(stop_ids)
    return [Request(list(x), p, stops, media if media else None, logprobs=logprobs)
            for x, p in zip(prompts, params)]  # fmt: skip


@torch.inference_mode()
def generate_steps(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids=(),
    pad_id: int = 0,
    media=None,
    options: DecodeOptions | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None for prompts that already stopped).

    A prompt stops after producing one of `stop_ids` (which is yielded) or after max_new_tokens,
    which is capped so that the prompt plus its new tokens fit the model's context
    (max_position_embeddings). A prompt that leaves no room for one new token is refused (G3nError
    naming both lengths), never truncated. Each row draws with `params.seed` (the first row) or a
    seed derived from it (the others). `media`: one prompt's images/audio (media.py's
    MediaProcessor output). `options`: how the model's engine decodes (DecodeOptions; default
    DecodeOptions()), sampling included. `pad_id` is unused (rows are never padded) and kept for
    callers that pass it.
    """
    for step in _run_rows(model, _requests(prompts, _per_row(params, len(prompts)), stop_ids, media), options):
        yield [None if t is None else t.token for t in step]


@torch.inference_mode()
def generate_rows(
    model,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_ids=(),
    pad_id: int = 0,
    stopped=None,
    media=None,
    options: DecodeOptions | None = None,
) -> Iterator[list[int | None]]:
    """Like generate_steps, but each row has its own SamplingParams (its own seed): a row gets
    exactly the tokens it would get alone. `stopped(row)` (optional) is asked before each step; a
    row for which it is true ends there (yields None from then on)."""
    for step in _run_rows(model, _requests(prompts, params, stop_ids, media), options, stopped):
        yield [None if t is None else t.token for t in step]


def generate(
    model, prompts: list[list[int]], params: SamplingParams, stop_ids=(), pad_id: int = 0, media=None,
    options: DecodeOptions | None = None, logprobs: int | None = None,
):  # fmt: skip
    """The new tokens of every prompt (stop tokens excluded), generated together (max_new_tokens
    capped by the context, see generate_steps). With `logprobs` (0..20): engine.Token objects
    instead of ids, each with its log-probability and the `logprobs` most likely alternatives."""
    requests = _requests(prompts, _per_row(params, len(prompts)), stop_ids, media, logprobs)
    out: list[list] = [[] for _ in prompts]
    stops = set(stop_ids)
    with torch.inference_mode():
        for step in _run_rows(model, requests, options):
            for row, t in enumerate(step):
                if t is not None and t.token not in stops:
                    out[row].append(t if logprobs is not None else t.token)
    return out


class TextStreamer:
    """Turns a growing list of token ids into new pieces of text, holding back broken UTF-8.

    Each push returns what `tokenizer.decode(ids so far)` gained since the last piece returned, or
    "" while that text ends in U+FFFD (a multi-byte character not complete yet). Decoding every id at
    every token would cost O(n^2) over a reply (the server streams on one worker thread), so only the
    ids since the last cut are decoded: a cut is a point after which later ids decode the same
    whatever came before it, so the text so far is the closed text plus the open ids' text.

    Decoding looks back past a point in two ways, which a cut rules out:
    - byte-fallback pieces (<0xE6>) join the bytes before them into characters. A cut needs the text
      not to end in U+FFFD: the bytes then end on a whole character (bytes cut short always decode to
      U+FFFD at the end), and the next bytes start a character of their own.
    - SentencePiece drops the leading "▁" (space) of a decode's first pieces, on tokenizers that add
      a dummy prefix or remove extra whitespace, while the text is still empty.
    So the open ids are decoded behind an anchor, the last few ids before the cut, whose own text is
    not empty, and the anchor's text is dropped: behind it no "▁" is dropped, as in the full decode,
    where the text before the cut was not empty either (bytes always decode to something, and a piece
    drops its "▁" in context only where it would on its own, coming first). A special token is a cut
    with no anchor: decode splits the ids there and decodes the ids after it on their own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._window: list[int] = []  # anchor ids, then the open ids
        self._anchor_chars = 0  # length of the anchor's own text, which starts the window's decode
        self._sent = 0  # characters of the open text already returned
        self._held = ""  # closed text not returned yet (it ended in U+FFFD)
        self._closed_incomplete = False  # the closed text ends in U+FFFD

    def push(self, token: int) -> str:
        self._window.append(token)
        text = self.tokenizer.decode(self._window)[self._anchor_chars :]  # the open ids' text
        incomplete = text.endswith("\ufffd") if text else self._closed_incomplete
        if incomplete:  # a multi-byte character is not complete yet
            piece = ""
        else:
            piece, self._held, self._sent = self._held + text[self._sent :], "", len(text)
        if self.tokenizer.is_special(token):
            self._cut(text, incomplete, [], 0)
        elif not incomplete:
            for n in range(1, min(4, len(self._window)) + 1):  # one id, unless its text alone is empty
                anchor_text = self.tokenizer.decode(self._window[-n:])
                if anchor_text:
                    self._cut(text, incomplete, self._window[-n:], len(anchor_text))
                    break
        return piece

    def _cut(self, text: str, incomplete: bool, anchor: list[int], anchor_chars: int) -> None:
        """Close the open text; later ids are decoded behind `anchor`."""
        if text:
            self._held += text[self._sent :]
            self._closed_incomplete = incomplete
        self._window, self._anchor_chars, self._sent = anchor, anchor_chars, 0


def stream_text(
    model, tokenizer, prompt_ids: list[int], params: SamplingParams, media=None, options: DecodeOptions | None = None,
    engine: Engine | None = None,
) -> Iterator[str]:  # fmt: skip
    """Pieces of the reply's text as they are generated; stops at eos or <end_of_turn>. Runs on
    `engine`, or the model's own engine for `options` (see generate_steps)."""
    engine = engine_for(model, options) if engine is None else engine
    streamer = TextStreamer(tokenizer)
    stops = frozenset(tokenizer.stop_ids)
    for t in engine.generate(Request(list(prompt_ids), params, stops, media or None)):
        if t.token in stops:
            return
        piece = streamer.push(t.token)
        if piece:
            yield piece
