"""Token generation: Google's recommended sampling, batching by left padding, streaming (the KV
cache and decode step live in engine.py).

Defaults are Google's recommendation for Gemma 3n: temperature 1.0, top_k 64, top_p 0.95,
min_p 0.0, repetition penalty 1.0 (off). The logits pass the filters in transformers' order
(repetition penalty, temperature, top-k, top-p, min-p), so the same settings mean the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from g3n.errors import G3nError
from g3n.inference.engine import Generator
from g3n.inference.options import DecodeOptions
from g3n.inference.sampling import SamplingParams, next_tokens, sample_tokens


def _copy_to_host(tokens: torch.Tensor):
    """Start copying `tokens` to the host without waiting for work queued after the copy;
    `_host_values` waits for this copy only. So a decode step queued in between runs on the GPU
    while the host reads and hands out the tokens before it."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _host_values(pending) -> list:
    host, done = pending
    if done is not None:
        done.synchronize()
    return host.tolist()


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, x in enumerate(prompts):
        ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x) :] = True
    return ids.to(device), mask.to(device)


def _context_limit(model, prompts: list[list[int]]) -> int:
    """The model's context; refuses empty prompts and prompts that leave no room for a token."""
    if not prompts or any(len(x) == 0 for x in prompts):
        raise G3nError("every prompt needs at least one token")
    limit = model.config.max_position_embeddings
    longest = max(len(x) for x in prompts)
    if longest >= limit:
        raise G3nError(
            f"prompt of {longest} tokens does not fit the model's context of {limit} tokens "
            f"(at most {limit - 1} leave room for one new token)"
        )
    return limit


def _sampling(options: DecodeOptions) -> dict:
    """sample_tokens' and next_tokens' keywords for the engine's options (the sampling kernels)."""
    return {"kernels": options.sample_kernels, "pdl": options.pdl}


def _prefill(model, prompts, pad_id: int, steps: int, penalize: bool, media, options: DecodeOptions, params=None):
    """Left-pad, build the engine for `steps` new tokens, prefill (images/audio merged in):
    (ids, tokens seen per row for the repetition penalty or None, engine, last logits).
    `params`: sampling settings for every row, which the engine's steps then sample with
    themselves (in the CUDA graph, when captured), returning tokens instead of logits."""
    ids, mask = _left_pad(prompts, pad_id, model.device)
    seen = None
    if penalize:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen.scatter_(1, torch.where(mask, ids, 0), mask)
    sample = None if params is None else partial(sample_tokens, p=params, seen=seen, **_sampling(options))
    engine = Generator(model, len(prompts), ids.shape[1] + steps, options=options, sample=sample)
    embeds = model.embed_inputs(ids, media) if media else None
    return ids, seen, engine, engine.prefill(ids, mask, embeds)


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
    which is capped so that the longest prompt plus its new tokens fit the model's context
    (max_position_embeddings). A prompt that leaves no room for one new token is refused (G3nError
    naming both lengths), never truncated. `media`: the prompts' images/audio (media.py's
    MediaProcessor output), in prompt order. `options`: how the engine decodes (DecodeOptions;
    default DecodeOptions()), sampling included.
    """
    options = DecodeOptions() if options is None else options
    limit = _context_limit(model, prompts)
    max_new = min(params.max_new_tokens, limit - max(len(x) for x in prompts))
    device = model.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    penalize = params.repetition_penalty != 1.0
    ids, seen, engine, logits = _prefill(model, prompts, pad_id, max_new, penalize, media, options, params)
    stops = set(stop_ids)
    done = [False] * len(prompts)

    def advance(tok, step):  # the next tokens: the engine samples them in its step
        if seen is not None:
            seen[torch.arange(len(prompts), device=device), tok] = True
        return engine.step(tok, ids.shape[1] + step, generator)

    tok = next_tokens(logits, params, seen, generator, **_sampling(options))
    for step in range(max_new):
        pending = _copy_to_host(tok)
        last = step == max_new - 1
        # A captured step is queued before the host reads `tok`, so the GPU runs it meanwhile
        # (wasted work if every row stops here); the first (capturing, maybe compiling) step
        # waits until the first token is out.
        queued = not last and engine.captured
        if queued:
            following = advance(tok, step)
        values = _host_values(pending)
        yield [None if d else t for t, d in zip(values, done)]
        done = [d or t in stops for t, d in zip(values, done)]
        if all(done) or last:
            return
        tok = following if queued else advance(tok, step)


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
    """Like generate_steps, but each row has its own SamplingParams and its own random generator,
    seeded with its own seed, so a row gets exactly the tokens it would get alone (and the same as
    generate_steps for a batch of one): what a server batching unrelated requests needs.

    `stopped(row)` (optional) is asked before each step; a row for which it is true ends there
    (yields None from then on), and the batch ends when every row has ended. `media`: the
    prompts' images/audio (media.py's MediaProcessor output), in prompt order, and `options`, as in
    generate_steps.
    """
    options = DecodeOptions() if options is None else options
    if len(params) != len(prompts):
        raise G3nError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    limit = _context_limit(model, prompts)
    # each row stops where it would alone; the cache is as long as the longest-running row needs
    max_new = [min(p.max_new_tokens, limit - len(x)) for p, x in zip(params, prompts, strict=True)]
    steps = max(max_new)
    if steps == 0:
        return
    device = model.device
    generators = [None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed) for p in params]
    penalize = any(p.repetition_penalty != 1.0 for p in params)
    ids, seen, engine, logits = _prefill(model, prompts, pad_id, steps, penalize, media, options)
    stops = set(stop_ids)
    done = [n == 0 for n in max_new]

    def advance(tokens, step):
        if seen is not None:
            seen[torch.arange(len(prompts), device=device), tokens] = True
        return engine.step(tokens, ids.shape[1] + step)

    for step in range(steps):
        if stopped is not None:
            done = [d or bool(stopped(row)) for row, d in enumerate(done)]
        if all(done):
            return
        live = [row for row, d in enumerate(done) if not d]
        tokens = torch.zeros(len(prompts), dtype=torch.long, device=device)
        for row in live:
            row_seen = None if seen is None else seen[row : row + 1]
            row_logits = logits[row : row + 1]
            tokens[row] = next_tokens(row_logits, params[row], row_seen, generators[row], **_sampling(options))[0]
        pending = _copy_to_host(tokens)
        # queued before the host reads `tokens` once captured, as in generate_steps
        queued = engine.captured and any(step + 1 < max_new[row] for row in live)
        if queued:
            logits = advance(tokens, step)
        values = _host_values(pending)
        out: list[int | None] = [None] * len(prompts)
        for row in live:
            out[row] = values[row]
            done[row] = out[row] in stops or step + 1 >= max_new[row]
        yield out
        if all(done):
            return
        if not queued:
            logits = advance(tokens, step)


def generate(
    model, prompts: list[list[int]], params: SamplingParams, stop_ids=(), pad_id: int = 0, media=None,
    options: DecodeOptions | None = None,
):  # fmt: skip
    """The new tokens of every prompt (stop tokens excluded), generated together as one batch
    (max_new_tokens capped by the context, see generate_steps)."""
    out: list[list[int]] = [[] for _ in prompts]
    stop_ids = set(stop_ids)
    for step in generate_steps(model, prompts, params, stop_ids, pad_id, media, options):
        for row, tok in enumerate(step):
            if tok is not None and tok not in stop_ids:
                out[row].append(tok)
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
    model, tokenizer, prompt_ids: list[int], params: SamplingParams, media=None, options: DecodeOptions | None = None
) -> Iterator[str]:
    """Pieces of the reply's text as they are generated; stops at eos or <end_of_turn>
    (`options`: see generate_steps)."""
    streamer = TextStreamer(tokenizer)
    stops = tokenizer.stop_ids
    for (tok,) in generate_steps(model, [prompt_ids], params, stops, tokenizer.pad_id, media, options):
        if tok is None or tok in stops:
            return
        piece = streamer.push(tok)
        if piece:
            yield piece
