"""The persistent engine (inference/engine.py): continuous batching, slot reuse, prefix reuse, the
per-row hooks, on the tiny model in float32 on the CPU (exact: a row's tokens do not depend on
what it is batched with)."""

import copy

import pytest
import torch

from g3n.errors import G3nError
from g3n.inference.engine import Engine, Request
from g3n.inference.sampling import SamplingParams


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def _prompt(tok, text):
    return tok.encode_chat([{"role": "user", "content": text}])


def _run(engine, requests, start_at=None):
    """Tokens per request; `start_at[i]`: the engine step at which request i is added."""
    start_at = start_at or [0] * len(requests)
    handles, out, step = {}, {}, 0
    while len(handles) < len(requests) or engine.busy:
        for i, r in enumerate(requests):
            if i not in handles and start_at[i] <= step:
                handles[i] = engine.add(r)
                out[handles[i]] = []
        for t in engine.step():
            out[t.handle].append(t.token)
        step += 1
    return [out[handles[i]] for i in range(len(requests))]


def test_a_row_joining_mid_flight_draws_what_it_draws_alone(model, tiny):
    tok = tiny[1]
    params = [SamplingParams(seed=s, max_new_tokens=n, temperature=1.3) for s, n in ((1, 30), (2, 12), (3, 20))]
    requests = [Request(_prompt(tok, q), p) for q, p in zip(("Hi", "Tell me a story", "What is 12+7?"), params)]
    alone = [_run(Engine(model, 1), [r])[0] for r in requests]
    assert len({tuple(a) for a in alone}) == 3 and all(len(a) == p.max_new_tokens for a, p in zip(alone, params))
    batched = _run(Engine(model, 4), requests, start_at=[0, 5, 9])  # the later ones join mid-flight
    assert batched == alone
    # two slots for three requests: the third waits for a free slot, which keeps nothing of its last row
    assert _run(Engine(model, 2), requests, start_at=[0, 0, 0]) == alone


def test_prefix_reuse_equals_a_fresh_prefill(model, tiny):
    """The next turn of a conversation prefills only what is new, with the logits of a fresh prefill."""
    tok = tiny[1]
    engine = Engine(model, 1)
    first = _prompt(tok, "Hi")
    reply = _run(engine, [Request(first, SamplingParams(greedy=True, max_new_tokens=8))])[0]
    held = list(engine.held[0])
    assert held == first + reply[:-1]  # the prompt and every fed token
    follow = held + tok.encode("and then?", add_bos=False)
    assert engine._reusable(held, _row(engine, follow)) == len(held)
    reused = engine.gen.prefill(0, follow[len(held) :], start=len(held))
    fresh = Engine(model, 1).gen.prefill(0, follow)
    assert (reused - fresh).abs().max() < 1e-5


def _row(engine, prompt):
    from g3n.inference.engine import _Row

    return _Row(0, Request(prompt), 1)


def test_hooks_logit_bias_logprobs_and_processor(model, tiny):
    tok = tiny[1]
    prompt = _prompt(tok, "Hi")
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    plain = _run(Engine(model, 1), [Request(prompt, greedy)])[0]
    banned = _run(Engine(model, 1), [Request(prompt, greedy, logit_bias={plain[0]: -100.0})])[0]
    assert banned[0] != plain[0]
    forced = _run(Engine(model, 1), [Request(prompt, greedy, logit_bias={42: 100.0})])[0]
    assert forced == [42] * 6
    engine = Engine(model, 2)
    handle = engine.add(Request(prompt, greedy, logprobs=3))
    tokens = []
    while engine.busy:
        tokens += [t for t in engine.step() if t.handle == handle]
    assert [t.token for t in tokens] == plain
    with torch.no_grad():
        logits = model(torch.tensor([prompt + plain[:-1]]))[0, len(prompt) - 1 :].float().log_softmax(-1)
    for t, row in zip(tokens, logits, strict=True):
        assert abs(t.logprob - row[t.token].item()) < 1e-4
        assert [i for i, _ in t.top] == row.topk(3).indices.tolist()

    def only_even(generated, logits):
        return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 1, float("-inf"))

    evens = _run(Engine(model, 1), [Request(prompt, SamplingParams(seed=1, max_new_tokens=8), processor=only_even)])
    assert all(t % 2 == 0 for t in evens[0])


def test_bad_requests_are_refused_with_both_lengths(model):
    engine = Engine(model, 1)
    limit = model.config.max_position_embeddings
    with pytest.raises(G3nError, match=f"prompt of {limit} tokens does not fit the model's context of {limit}"):
        engine.add(Request([2] * limit))
    with pytest.raises(G3nError, match="logit_bias names token"):
        engine.add(Request([2, 3], logit_bias={10**9: 1.0}))
