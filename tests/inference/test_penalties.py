"""OpenAI's frequency and presence penalties in the engine's per-row sampling, against a plain
reference (full forward over the sequence so far, logits[t] -= presence * (count[t] > 0) +
frequency * count[t] over the generated tokens, then the same draw), and batched with rows
without them (each row gives what it gives alone). Tiny model, float32, CPU."""

import collections
import copy
import dataclasses

import pytest
import torch

from g3n.errors import G3nError
from g3n.inference.engine import Engine, Request
from g3n.inference.sampling import RowSampling, SamplingParams, candidate_cap, sample_rows
from helpers import run_requests


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def _prompt(tok, text):
    return tok.encode_chat([{"role": "user", "content": text}])


@torch.no_grad()
def _reference(model, prompt: list[int], p: SamplingParams) -> list[int]:
    """The penalties written out plainly, then the engine's own draw for the settings without them."""
    plain = dataclasses.replace(p, frequency_penalty=0.0, presence_penalty=0.0)
    rows = RowSampling(1, model.config.vocab_size, "cpu")
    rows.set(0, plain, p.seed or 0, prompt)
    generated: list[int] = []
    for _ in range(p.max_new_tokens):
        logits = model(torch.tensor([prompt + generated]))[0, -1].float()
        for token, n in collections.Counter(generated).items():
            logits[token] -= p.presence_penalty * (n > 0) + p.frequency_penalty * n
        position = torch.tensor([len(prompt) + len(generated)])
        token = sample_rows(logits[None], rows, position, candidate_cap([plain]), kernels=False)[0].item()
        rows.mark(torch.tensor([token]))  # the repetition penalty's record (off here), as the engine keeps it
        generated.append(token)
    return generated


CASES = [
    SamplingParams(greedy=True, max_new_tokens=12, frequency_penalty=1.5),
    SamplingParams(greedy=True, max_new_tokens=12, presence_penalty=2.0),
    SamplingParams(greedy=True, max_new_tokens=12, frequency_penalty=-1.0, presence_penalty=0.5),
    SamplingParams(seed=3, temperature=1.2, max_new_tokens=12, frequency_penalty=2.0, presence_penalty=-0.5),
    SamplingParams(seed=4, top_k=0, top_p=0.9, max_new_tokens=12, frequency_penalty=0.7, presence_penalty=1.3),
]


@pytest.mark.parametrize("p", CASES, ids=lambda p: f"f{p.frequency_penalty}-p{p.presence_penalty}-g{p.greedy}")
def test_penalties_match_a_plain_reference(model, tiny, p):
    prompt = _prompt(tiny[1], "Say 1 1 1 1 1")
    got = run_requests(Engine(model, 1), [Request(prompt, p)])[0]
    assert got == _reference(model, prompt, p)


def test_penalties_change_a_greedy_reply_and_zero_changes_nothing(model, tiny):
    prompt = _prompt(tiny[1], "Say 1 1 1 1 1")
    plain = run_requests(Engine(model, 1), [Request(prompt, SamplingParams(greedy=True, max_new_tokens=16))])[0]
    zero = SamplingParams(greedy=True, max_new_tokens=16, frequency_penalty=0.0, presence_penalty=0.0)
    assert run_requests(Engine(model, 1), [Request(prompt, zero)])[0] == plain
    strong = SamplingParams(greedy=True, max_new_tokens=16, presence_penalty=2.0, frequency_penalty=2.0)
    penalized = run_requests(Engine(model, 1), [Request(prompt, strong)])[0]
    assert penalized != plain
    assert max(collections.Counter(penalized).values()) <= max(collections.Counter(plain).values())


def test_a_row_with_penalties_batched_with_one_without_gives_each_what_it_gives_alone(model, tiny):
    tok = tiny[1]
    requests = [
        Request(_prompt(tok, "Say 1 1 1 1 1"), SamplingParams(seed=1, max_new_tokens=20, frequency_penalty=2.0)),
        Request(_prompt(tok, "Tell me a story"), SamplingParams(seed=2, max_new_tokens=16)),
        Request(_prompt(tok, "What is 12+7?"), SamplingParams(greedy=True, max_new_tokens=14, presence_penalty=1.5)),
    ]
    alone = [run_requests(Engine(model, 1), [r])[0] for r in requests]
    assert run_requests(Engine(model, 4), requests) == alone
    assert run_requests(Engine(model, 4), requests, start_at=[0, 4, 7]) == alone  # joining mid-flight
    # a slot reused by a row without penalties starts with no counts of the last one's tokens
    assert run_requests(Engine(model, 1), requests, start_at=[0, 0, 0]) == alone


def test_counts_cover_generated_tokens_only():
    rows = RowSampling(2, 10, "cpu")
    rows.set(0, SamplingParams(frequency_penalty=1.0), 0, [3, 3, 4])
    rows.set(1, SamplingParams(), 0, [5])
    assert rows.counts.sum() == 0 and rows.seen[0, 3] and rows.seen[1, 5]
    rows.mark(torch.tensor([3, 7]), live=torch.tensor([True, False]))
    rows.mark(torch.tensor([3, 7]), live=torch.tensor([True, True]))
    assert rows.counts[0].tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0] and rows.counts[1, 7] == 1
    rows.set(0, SamplingParams(), 0, [1])
    assert rows.counts[0].sum() == 0


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
def test_penalties_outside_openais_range_are_refused(name):
    with pytest.raises(G3nError, match=name):
        SamplingParams(**{name: 2.5})
