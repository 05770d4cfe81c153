"""The persistent engine (inference/engine.py): continuous batching, slot reuse, prefix reuse, the
per-row hooks, on the tiny model in float32 on the CPU (exact: a row's tokens do not depend on
what it is batched with)."""

import copy
import dataclasses

import pytest
import torch

from g3n.errors import G3nError
from g3n.inference.engine import Engine, Request
from g3n.inference.options import DecodeOptions
from g3n.inference.sampling import SamplingParams
from helpers import replaying_cuda_graph, run_requests, teacher_forced, tiny_with_saved_adapter


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def _prompt(tok, text):
    return tok.encode_chat([{"role": "user", "content": text}])


def test_a_row_joining_mid_flight_draws_what_it_draws_alone(model, tiny):
    tok = tiny[1]
    params = [SamplingParams(seed=s, max_new_tokens=n, temperature=1.3) for s, n in ((1, 30), (2, 12), (3, 20))]
    requests = [Request(_prompt(tok, q), p) for q, p in zip(("Hi", "Tell me a story", "What is 12+7?"), params)]
    alone = [run_requests(Engine(model, 1), [r])[0] for r in requests]
    assert len({tuple(a) for a in alone}) == 3 and all(len(a) == p.max_new_tokens for a, p in zip(alone, params))
    batched = run_requests(Engine(model, 4), requests, start_at=[0, 5, 9])  # the later ones join mid-flight
    assert batched == alone
    # two slots for three requests: the third waits for a free slot, which keeps nothing of its last row
    assert run_requests(Engine(model, 2), requests, start_at=[0, 0, 0]) == alone


def test_prefix_reuse_equals_a_fresh_prefill(model, tiny):
    """The next turn of a conversation prefills only what is new, with the logits of a fresh prefill."""
    tok = tiny[1]
    engine = Engine(model, 1)
    first = _prompt(tok, "Hi")
    reply = run_requests(engine, [Request(first, SamplingParams(greedy=True, max_new_tokens=8))])[0]
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
    plain = run_requests(Engine(model, 1), [Request(prompt, greedy)])[0]
    banned = run_requests(Engine(model, 1), [Request(prompt, greedy, logit_bias={plain[0]: -100.0})])[0]
    assert banned[0] != plain[0]
    forced = run_requests(Engine(model, 1), [Request(prompt, greedy, logit_bias={42: 100.0})])[0]
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

    evens = run_requests(
        Engine(model, 1), [Request(prompt, SamplingParams(seed=1, max_new_tokens=8), processor=only_even)]
    )
    assert all(t % 2 == 0 for t in evens[0])


def test_processor_rows_batch_and_chain(model, tiny):
    """A row with a processor beside a plain row: each draws what it draws alone, and the processor
    sees, before each of its row's draws, exactly the tokens the row has produced (steps stay
    queued ahead of the host's read; the row is drawn again once its last token is read)."""
    tok = tiny[1]
    seen = []

    def only_even(generated, logits):
        seen.append(list(generated))
        return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 1, float("-inf"))

    hooked = Request(_prompt(tok, "Hi"), SamplingParams(seed=1, max_new_tokens=10), processor=only_even)
    plain = Request(_prompt(tok, "What is the capital of France?"), SamplingParams(seed=2, max_new_tokens=10))
    alone = [run_requests(Engine(model, 1), [r])[0] for r in (hooked, plain)]
    seen.clear()
    engine, followed = Engine(model, 2), []
    follow = engine.gen.follow
    engine.gen.follow = lambda *args: followed.append(1) or follow(*args)
    assert run_requests(engine, [hooked, plain]) == alone
    assert seen == [alone[0][:i] for i in range(10)] and all(t % 2 == 0 for t in alone[0])
    assert len(followed) >= 6  # the steps after the first ones were queued ahead


def test_bad_requests_are_refused_with_both_lengths(model):
    engine = Engine(model, 1)
    limit = model.config.max_position_embeddings
    with pytest.raises(G3nError, match=f"prompt of {limit} tokens does not fit the model's context of {limit}"):
        engine.add(Request([2] * limit))
    with pytest.raises(G3nError, match="logit_bias names token"):
        engine.add(Request([2, 3], logit_bias={10**9: 1.0}))


def test_a_shared_prefix_longer_than_the_window_is_reused_across_rows(model, tiny):
    """Requests that start with the same long system prompt (past the sliding window, so the rows'
    rings no longer hold its end once they go on): the engine keeps the cache at the end of the
    common part, and a later request in another row restores it, prefills only its own part, and
    gets the tokens it gets alone, and the logits of a fresh prefill in the same chunks."""
    tok = tiny[1]
    system = "You are a helpful assistant who answers in one short sentence. " * 12
    prompts = [tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in ("Hi", "What is the capital of France?", "Name a colour.")]  # fmt: skip
    shared = min(_common(prompts[0], p) for p in prompts[1:])
    assert shared > model.config.sliding_window
    greedy = SamplingParams(greedy=True, max_new_tokens=12)
    alone = [run_requests(Engine(model, 1), [Request(p, greedy)])[0] for p in prompts]
    engine = Engine(model, 2)
    first = run_requests(engine, [Request(p, greedy) for p in prompts[:2]], start_at=[0, 1])
    assert first == alone[:2] and engine.reused_tokens == 0
    assert [len(s.ids) for s in engine.prefixes.values()] == [_common(prompts[0], prompts[1])]
    # both rows went on past the window; the third request lands in one of them and reuses the copy
    assert run_requests(engine, [Request(prompts[2], greedy)])[0] == alone[2]
    assert engine.reused_tokens == shared
    restored = Engine(model, 1)
    restored.gen.cache.restore(0, next(iter(engine.prefixes.values())))
    reused = restored.gen.prefill(0, prompts[2][shared:], start=shared)
    fresh = Engine(model, 1).gen
    fresh.prefill(0, prompts[2][:shared])
    assert torch.equal(reused, fresh.prefill(0, prompts[2][shared:], start=shared))  # the copy is exact


def test_shared_prefix_copies_stay_within_their_budget(model, tiny):
    """Copies past `prefix_cache_mb` push out the least recently used; none are kept at 0."""
    tok = tiny[1]
    greedy = SamplingParams(greedy=True, max_new_tokens=2)

    def pairs(engine, topics):
        for i in topics:
            base = tok.encode_chat([{"role": "user", "content": f"Topic {i}: " + "tell me more about it. " * 8}])
            run_requests(engine, [Request(base + [5, 6], greedy), Request(base + [7, 8], greedy)])
        return engine

    one = next(iter(pairs(Engine(model, 1), [0]).prefixes.values())).nbytes
    engine = pairs(Engine(model, 1, prefix_cache_mb=2.5 * one / 2**20), range(4))
    assert len(engine.prefixes) == 2 and sum(s.nbytes for s in engine.prefixes.values()) <= 2.5 * one
    assert list(engine.prefixes) == list(pairs(Engine(model, 1), [2, 3]).prefixes)  # the two most recent
    assert not pairs(Engine(model, 1, prefix_cache_mb=0), [0]).prefixes


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_graphs_reused_across_requests_equal_a_fresh_engine(model, tiny, monkeypatch):
    """The captured steps (graph inputs and outputs kept for the engine's life) serve request after
    request, joined mid-flight and in reused slots, with the tokens each gets on a fresh engine."""
    tok = tiny[1]
    requests = [
        Request(_prompt(tok, q), SamplingParams(seed=s, max_new_tokens=n))
        for q, s, n in (("Hi", 1, 9), ("Tell me a story", 2, 14), ("What is 12+7?", 3, 6), ("Bye", 4, 8))
    ]
    fresh = [run_requests(Engine(model, 1), [r])[0] for r in requests]
    replaying_cuda_graph(monkeypatch)
    engine = Engine(model, 2, DecodeOptions(compile="off"), cuda_graph=True)
    assert run_requests(engine, requests[:2], start_at=[0, 3]) == fresh[:2]
    assert engine.gen.graphs  # the steps ran as captured graphs
    assert run_requests(engine, requests[2:], start_at=[0, 2]) == fresh[2:]


def test_rows_with_different_adapters_share_steps(model, tiny, tmp_path):
    """Two LoRA adapters served beside the base model: rows of each and of none, batched and
    joining mid-flight (one prompt under two adapters), draw what each draws alone on the model
    with its adapter merged; the fused decode layers add the same deltas."""
    from g3n.adapters.merge import merge_lora

    tok = tiny[1]
    merged = {None: model}
    for i, name in enumerate(("a", "b")):
        merged[name] = merge_lora(tiny_with_saved_adapter(tmp_path / name, seed=i + 1))
    prompts = [_prompt(tok, q) for q in ("Hi", "Tell me a story", "What is 12+7?", "Hi")]
    names = [None, "a", "b", "a"]
    requests = [Request(p, SamplingParams(seed=i, max_new_tokens=10), adapter=n, logprobs=0)
                for i, (p, n) in enumerate(zip(prompts, names, strict=True))]  # fmt: skip

    def run(engine, requests, start_at=None):  # tokens and their log-probabilities (which the adapter moves)
        out = run_requests(engine, requests, start_at, full=True)
        return [[(t.token, round(t.logprob, 4)) for t in tokens] for tokens in out]

    alone = [run(Engine(merged[r.adapter], 1), [dataclasses.replace(r, adapter=None)])[0] for r in requests]
    assert alone[0] != alone[3]  # one prompt, another adapter
    engine = Engine(model, 4)
    for name in ("a", "b"):
        engine.add_adapter(name, tmp_path / name)
    assert run(engine, requests, start_at=[0, 2, 4, 6]) == alone
    with pytest.raises(G3nError, match="no adapter named 'c'"):
        engine.add(Request(prompts[0], adapter="c"))

    ids = torch.tensor([prompts[1] + [t for t, _ in alone[1][:-1]]])
    expected = teacher_forced(merged["a"], ids, prompt_len=len(prompts[1]), fused=True)
    assert (teacher_forced(model, ids, prompt_len=len(prompts[1])) - expected).abs().max() > 0.1  # it matters
    fused = Engine(copy.deepcopy(model), 2)
    fused.add_adapter("a", tmp_path / "a")
    gen = fused.gen
    gen.fused = True  # the decode layers a compiled GPU step runs, eagerly
    out = [gen.prefill(1, ids[0, : len(prompts[1])], adapter=0)]
    for pos in range(len(prompts[1]), ids.shape[1]):
        step = gen.step([0, ids[0, pos].item()], [0, pos], torch.tensor([False, True]), adapters=[-1, 0])
        out.append(step.logits[1:].clone())
    assert (torch.stack(out, dim=1) - expected).abs().max() < 1e-4
