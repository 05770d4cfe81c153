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


def _prefill(model, prompts, pad_id: int, steps: int, penalize: bool, media=None, compile=None, params=None):
    """Left-pad, build the engine for `steps` new tokens, prefill (images/audio merged in):
    (ids, tokens seen per row for the repetition penalty or None, engine, last logits).
    `params`: sampling settings for every row, which the engine's steps then sample with
    themselves (in the CUDA graph, when captured), returning tokens instead of logits."""
    ids, mask = _left_pad(prompts, pad_id, model.device)
    seen = None
    if penalize:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen.scatter_(1, torch.where(mask, ids, 0), mask)
    sample = None if params is None else partial(sample_tokens, p=params, seen=seen)
    engine = Generator(model, len(prompts), ids.shape[1] + steps, compile=compile, sample=sample)
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
    compile=None,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None for prompts that already stopped).

    A prompt stops after producing one of `stop_ids` (which is yielded) or after max_new_tokens,
    which is capped so that the longest prompt plus its new tokens fit the model's context
    (max_position_embeddings). A prompt that leaves no room for one new token is refused (G3nError
    naming both lengths), never truncated. `media`: the prompts' images/audio (media.py's
    MediaProcessor output), in prompt order. `compile`: see engine.Generator.
    """
    limit = _context_limit(model, prompts)
    max_new = min(params.max_new_tokens, limit - max(len(x) for x in prompts))
    device = model.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    penalize = params.repetition_penalty != 1.0
    ids, seen, engine, logits = _prefill(model, prompts, pad_id, max_new, penalize, media, compile, params)
    stops = set(stop_ids)
    done = [False] * len(prompts)

    def advance(tok, step):  # the next tokens: the engine samples them in its step
        if seen is not None:
            seen[torch.arange(len(prompts), device=device), tok] = True
        return engine.step(tok, ids.shape[1] + step, generator)

    tok = next_tokens(logits, params, seen, generator)
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
    compile=None,
) -> Iterator[list[int | None]]:
    """Like generate_steps, but each row has its own SamplingParams and its own random generator,
    seeded with its own seed, so a row gets exactly the tokens it would get alone (and the same as
    generate_steps for a batch of one): what a server batching unrelated requests needs.

    `stopped(row)` (optional) is asked before each step; a row for which it is true ends there
    (yields None from then on), and the batch ends when every row has ended. `media`: the
    prompts' images/audio (media.py's MediaProcessor output), in prompt order, as in generate_steps;
    `compile`: see engine.Generator (default: G3N_COMPILE in the environment).
    """
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
    ids, seen, engine, logits = _prefill(model, prompts, pad_id, steps, penalize, media, compile)
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
            tokens[row] = next_tokens(logits[row : row + 1], params[row], row_seen, generators[row])[0]
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
    model, prompts: list[list[int]], params: SamplingParams, stop_ids=(), pad_id: int = 0, media=None, compile=None
):
    """The new tokens of every prompt (stop tokens excluded), generated together as one batch
    (max_new_tokens capped by the context, see generate_steps)."""
    out: list[list[int]] = [[] for _ in prompts]
    stop_ids = set(stop_ids)
    for step in generate_steps(model, prompts, params, stop_ids, pad_id, media, compile):
        for row, tok in enumerate(step):
            if tok is not None and tok not in stop_ids:
                out[row].append(tok)
    return out


class TextStreamer:
    """Turns a growing list of token ids into new pieces of text, holding back broken UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new


def stream_text(
    model, tokenizer, prompt_ids: list[int], params: SamplingParams, media=None, compile=None
) -> Iterator[str]:
    """Pieces of the reply's text as they are generated; stops at eos or <end_of_turn>
    (`compile`: see engine.Generator)."""
    streamer = TextStreamer(tokenizer)
    stops = tokenizer.stop_ids
    for (tok,) in generate_steps(model, [prompt_ids], params, stops, tokenizer.pad_id, media, compile):
        if tok is None or tok in stops:
            return
        piece = streamer.push(tok)
        if piece:
            yield piece
