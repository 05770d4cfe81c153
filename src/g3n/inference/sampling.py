"""Sampling: Google's recommended settings for Gemma 3n and the filters in transformers' order.

Defaults: temperature 1.0, top_k 64, top_p 0.95, min_p 0.0, repetition penalty 1.0 (off). The
logits pass the filters in transformers' order (repetition penalty, temperature, top-k, top-p,
min-p), so the same settings mean the same thing; OpenAI's frequency and presence penalties (per
row, `RowSampling`, over the tokens generated so far) come first, after logit_bias. Draws are inverse-CDF
draws at given uniform numbers, so the engine can sample inside its captured step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g3n.errors import G3nError
from g3n.kernels import sampling as sample_kernels

# Below this a temperature is greedy: logits / 1e-5 already make every token but the best (up to
# ties) vanish, and far smaller ones overflow float32 into NaNs.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: minus this x the times a token was generated
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token was generated
    greedy: bool = False
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self):
        checks = {  # name: (valid, rule); NaN fails every comparison
            "temperature": (self.temperature >= 0, f"must be >= 0 (below {MIN_TEMPERATURE}: greedy)"),
            "top_k": (self.top_k >= 0, "must be >= 0 (0 = off)"),
            "top_p": (0 < self.top_p <= 1, "must be in (0, 1]"),
            "min_p": (0 <= self.min_p <= 1, "must be in [0, 1]"),
            "repetition_penalty": (self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            "frequency_penalty": (-2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            "presence_penalty": (-2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            "max_new_tokens": (self.max_new_tokens >= 0, "must be >= 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise G3nError(f"invalid {name}: {getattr(self, name)!r} ({rule})")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature, self.greedy = 0.0, True


def _penalize_and_scale(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if p.repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if p.temperature not in (0.0, 1.0):
        logits = logits / p.temperature
    return logits


def _top_p_min_p(logits: torch.Tensor, p: SamplingParams, descending: bool = False) -> torch.Tensor:
    """Top-p then min-p on (batch, n) logits; `descending`: they are sorted largest first (top-k's
    candidates), so top-p needs no sort: the ascending order's cumulative sums, as transformers
    takes them, are the flipped order's."""
    if p.top_p < 1.0:
        if descending:
            drop = logits.softmax(-1).flip(-1).cumsum(-1).flip(-1) <= 1 - p.top_p
            drop[..., :1] = False  # always keep the most likely token
        else:
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cumulative <= 1 - p.top_p
            drop_sorted[..., -1:] = False  # always keep the most likely token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = p.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k, top-p and min-p to (batch, vocab) logits.

    Removed entries become -inf; `seen` (batch, vocab) bool marks tokens already in the sequence.
    """
    logits = _penalize_and_scale(logits, p, seen)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return _top_p_min_p(logits, p)


def candidate_probs(logits, p: SamplingParams, seen=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs, ids): the sampling distribution over the top_k candidates and their token ids, or
    over the whole vocabulary (ids None) without top-k. Equal to softmax(filter_logits) (barring
    ties at the k-th logit), but top-p and min-p sort k values instead of the vocabulary: sorting
    262400 logits per token took about 3 ms on an H200, more than a whole E2B decode step."""
    return _candidates(_penalize_and_scale(logits, p, seen), p)


def _candidates(logits, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    if p.top_k and p.top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, p.top_k, dim=-1)
        return _top_p_min_p(values, p, descending=True).softmax(-1), ids
    return _top_p_min_p(logits, p).softmax(-1), None


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` (batch, n), drawn by inverting the cumulative distribution at
    `uniform` (batch,) in [0, 1): the first entry whose cumulative probability exceeds uniform x
    total, never an entry of probability 0. Unlike torch.multinomial it takes its random numbers
    as an input, so a CUDA graph replays it with fresh ones (engine.Generator's `sample`)."""
    cdf = probs.float().cumsum(-1)
    picked = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(-1, keepdim=True)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, positions, 0).amax(-1, keepdim=True)  # rounding at u near 1
    return torch.minimum(picked, last_possible)


def sample_tokens(logits, p: SamplingParams, seen=None, uniform=None, kernels=True, pdl=True) -> torch.Tensor:
    """One token per row: argmax when greedy (after the repetition penalty, as in transformers
    and llama.cpp), else a draw at `uniform` (batch,) from the filtered distribution. `kernels`:
    top-k through kernels/sampling.py where it can run (`pdl`: their launches'); the engine's
    DecodeOptions.sample_kernels and .pdl."""
    logits = _penalize_and_scale(logits, p, seen)
    if p.greedy:
        return logits.argmax(-1)
    if kernels and sample_kernels.usable(logits, p.top_k):  # on CUDA: 3 kernels instead of about 47
        return sample_kernels.sample_top_k(logits, p.top_k, p.top_p, p.min_p, uniform, pdl)
    probs, ids = _candidates(logits, p)
    drawn = draw(probs, uniform)
    return (drawn if ids is None else ids.gather(-1, drawn)).squeeze(-1)


def next_tokens(logits, p: SamplingParams, seen=None, generator=None, kernels=True, pdl=True) -> torch.Tensor:
    """sample_tokens with one uniform number per row from `generator` (the same numbers a
    decode step sampling in its CUDA graph draws: engine.Generator.step)."""
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return sample_tokens(logits, p, seen, uniform, kernels, pdl)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding 32-bit values; its
    multipliers are below 2**31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def uniform_at(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row, a hash of the row's seed and the position of the token
    being drawn: a row draws the same numbers alone, in any batch, and wherever it joins one, with
    no random state to carry (and inside a CUDA graph)."""
    x = _mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    x = _mix32(x ^ (positions & _MASK32))
    return (x >> 8).float() * 2.0**-24


class RowSampling:
    """Each row's sampling settings as tensors (what a step samples every row with, in one go):
    temperature, top_k, top_p, min_p, repetition penalty, frequency and presence penalties,
    greedy, seed; `bias` (rows, vocab) is added to the logits first (OpenAI's logit_bias, and any
    additive per-row mask); `seen` (rows, vocab) marks the tokens of each row's sequence (the
    repetition penalty's); `counts` (rows, vocab) how often each token was generated (the prompt
    not counted: the frequency and presence penalties')."""

    def __init__(self, rows: int, vocab: int, device):
        def full(value, dtype=torch.float32):
            return torch.full((rows,), value, dtype=dtype, device=device)

        self.temperature, self.top_k, self.top_p = full(1.0), full(64, torch.long), full(1.0)
        self.min_p, self.repetition, self.greedy = full(0.0), full(1.0), full(False, torch.bool)
        self.frequency, self.presence = full(0.0), full(0.0)
        self.seed = full(0, torch.long)
        self.bias = torch.zeros(rows, vocab, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(rows, vocab, device=device)

    def view(self, rows: slice | torch.Tensor) -> RowSampling:
        out = object.__new__(RowSampling)
        out.__dict__.update({k: v[rows] for k, v in self.__dict__.items()})
        return out

    def set(self, row: int, p: SamplingParams, seed: int, sequence: list[int], bias: dict[int, float] | None = None):
        """Row `row` samples with `p` and `seed`, its sequence so far being `sequence`."""
        for name, value in (("temperature", p.temperature), ("top_k", p.top_k), ("top_p", p.top_p),
                            ("min_p", p.min_p), ("repetition", p.repetition_penalty), ("greedy", p.greedy),
                            ("frequency", p.frequency_penalty), ("presence", p.presence_penalty),
                            ("seed", seed & (2**63 - 1))):  # fmt: skip
            getattr(self, name)[row] = value
        self.bias[row].zero_()
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long)
            self.bias[row, ids.to(self.bias.device)] = torch.tensor(list(bias.values())).to(self.bias)
        self.seen[row].zero_()
        self.counts[row].zero_()
        if sequence:
            self.seen[row, torch.tensor(sequence, device=self.seen.device)] = True

    def mark(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Add `tokens` (rows,) to the rows' sequences (only the `live` rows'): generated tokens,
        the ones a decode step feeds."""
        at = tokens[:, None]
        value = torch.ones_like(at, dtype=torch.bool) if live is None else live[:, None] | self.seen.gather(1, at)
        self.seen.scatter_(1, at, value)
        added = torch.ones_like(at, dtype=self.counts.dtype) if live is None else live[:, None].to(self.counts.dtype)
        self.counts.scatter_add_(1, at, added)


def candidate_cap(params: list[SamplingParams]) -> int:
    """The number of candidates a step over rows with these settings draws among: 64, or 0 (the
    whole vocabulary, sorted) when a row has top-k off or above 64."""
    return 64 if all(p.greedy or 1 <= p.top_k <= 64 for p in params) else 0


def sample_rows(logits, s: RowSampling, positions, k_cap: int, kernels=True, pdl=True) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab), each row with its own settings (`s`) and the
    uniform number of its seed at `positions` (rows,): what sample_tokens gives that row alone
    (barring ties at the k-th logit and the order of float32 sums). `k_cap`: candidate_cap of the
    rows' settings (64: every row's top-k is in 1..64; 0: the whole vocabulary). `kernels`: draw
    through kernels/sampling.py where it can run (`pdl`: their launches')."""
    logits = logits.float() + s.bias
    counts = s.counts  # OpenAI's frequency and presence penalties (0.0 for rows without them)
    logits = logits - counts * s.frequency[:, None] - (counts > 0) * s.presence[:, None]
    rep = s.repetition[:, None]
    penalized = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(s.seen & (rep != 1.0), penalized, logits)
    greedy = logits.argmax(-1)
    logits = logits / torch.where(s.greedy | (s.temperature == 0), 1.0, s.temperature)[:, None]
    uniform = uniform_at(s.seed, positions)
    if kernels and k_cap and sample_kernels.usable_rows(logits, k_cap):
        drawn = sample_kernels.sample_top_k_rows(logits, s.top_k, s.top_p, s.min_p, uniform, k_cap, pdl)
        return torch.where(s.greedy, greedy, drawn)
    if k_cap:
        values, ids = torch.topk(logits, k_cap, dim=-1)
    else:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(values.shape[-1], device=values.device)
    top_k = torch.where(s.top_k > 0, s.top_k, values.shape[-1])
    values = values.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = values.softmax(-1)  # top-p: drop where the tail from here holds <= 1 - top_p
    tail = probs.flip(-1).cumsum(-1).flip(-1)
    values = values.masked_fill((tail <= 1 - s.top_p[:, None]) & (rank > 0), float("-inf"))
    probs = values.softmax(-1)
    values = values.masked_fill(probs < s.min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    drawn = ids.gather(-1, draw(values.softmax(-1), uniform)).squeeze(-1)
    return torch.where(s.greedy, greedy, drawn)
