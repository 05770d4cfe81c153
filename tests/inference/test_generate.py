"""Generation: sampling filters equal transformers' warpers, greedy equals the full forward's argmax,
batched equals one-by-one, seeds reproduce, stop tokens stop."""

import pytest
import torch

from g3n.errors import G3nError
from g3n.inference.generate import TextStreamer, generate, generate_steps, stream_text
from g3n.inference.sampling import SamplingParams, filter_logits


def _hf_filter(logits, p, input_ids):
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs(input_ids, logits.clone())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),  # Google's defaults
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8),
        SamplingParams(top_k=0, top_p=1.0, min_p=0.05),
        SamplingParams(top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3, temperature=1.5),
    ],
)
def test_filters_match_transformers(params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 4
    input_ids = torch.randint(0, 500, (3, 12), generator=g)
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = filter_logits(logits, params, seen)
    ref = _hf_filter(logits, params, input_ids)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_defaults_are_googles():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (1.0, 64, 0.95, 0.0, 1.0)
    assert not p.greedy


@pytest.mark.parametrize(
    "field,value,rule",
    [("top_p", 0.0, r"\(0, 1\]"), ("top_p", 1.01, r"\(0, 1\]"), ("temperature", -1.0, ">= 0"),
     ("temperature", float("nan"), ">= 0"), ("top_k", -2, ">= 0"), ("min_p", 1.5, r"\[0, 1\]"),
     ("min_p", -0.1, r"\[0, 1\]"), ("repetition_penalty", 0.0, "> 0"), ("max_new_tokens", -1, ">= 0")],
)  # fmt: skip
def test_invalid_sampling_params(field, value, rule):
    with pytest.raises(G3nError, match=f"invalid {field}: .*{rule}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-3])
def test_top_p_edges_accepted(value):
    assert SamplingParams(top_p=value, min_p=1.0, temperature=0.0).greedy


def test_greedy_equals_argmax_of_full_forward(tiny):
    model, tok = tiny
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of Italy?"}])
    (new,) = generate(model, [prompt], SamplingParams(greedy=True, max_new_tokens=12), stop_ids=())
    assert len(new) == 12
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))
    expected = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert new == expected


def test_greedy_applies_the_repetition_penalty_as_transformers(hf_model, ours):
    """Greedy decoding with a repetition penalty picks the argmax of the penalized logits, the
    same tokens as transformers' generate(do_sample=False, repetition_penalty=...)."""
    prompt = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(5))
    params = SamplingParams(greedy=True, repetition_penalty=3.0, max_new_tokens=12)
    (new,) = generate(ours, [prompt[0].tolist()], params, stop_ids=())
    with torch.no_grad():
        ref = hf_model.generate(prompt, do_sample=False, repetition_penalty=3.0, max_new_tokens=12,
                                min_new_tokens=12, eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert new == ref[0, 10:].tolist()
    (plain,) = generate(ours, [prompt[0].tolist()], SamplingParams(greedy=True, max_new_tokens=12), stop_ids=())
    assert plain != new  # the penalty changed the choice (else this test would not see it)


def test_batched_equals_one_by_one(tiny):
    model, tok = tiny
    questions = ["Hi", "What is 12+7?", "What is the opposite of hot?", "What sound does a duck make?"]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) > 1
    params = SamplingParams(greedy=True, max_new_tokens=20)
    batched = generate(model, prompts, params, tok.stop_ids)
    alone = [generate(model, [p], params, tok.stop_ids)[0] for p in prompts]
    assert batched == alone


def test_seed_reproduces(tiny):
    model, tok = tiny
    prompt = tok.encode("Once", add_bos=True)
    params = lambda seed: SamplingParams(seed=seed, max_new_tokens=15, temperature=1.5, top_k=0, top_p=1.0)
    a = generate(model, [prompt], params(1))[0]
    b = generate(model, [prompt], params(1))[0]
    others = [generate(model, [prompt], params(s))[0] for s in (2, 3, 4)]
    assert a == b
    assert any(o != a for o in others)


def test_draw_inverts_the_cumulative_distribution():
    """draw (the sampling step a CUDA graph replays with fresh uniform numbers) picks each entry
    for exactly its share of [0, 1), and never an entry of probability 0, even at u near 1."""
    from g3n.inference.sampling import draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0, 0.0], [0.0, 0.25, 0.25, 0.0, 0.5, 0.0]])
    grid = (torch.arange(1000) + 0.5) / 1000  # evenly spread uniform numbers
    picks = torch.stack([draw(probs, torch.full((2,), u.item())) for u in grid]).squeeze(-1)  # (1000, 2)
    for row in range(2):
        counts = torch.bincount(picks[:, row], minlength=6).float() / len(grid)
        torch.testing.assert_close(counts, probs[row], atol=1e-3, rtol=0)
    edges = draw(probs, torch.tensor([1 - 2**-24, 0.0]))
    assert edges.squeeze(-1).tolist() == [3, 1]


def test_seeded_steps_equal_rows_alone(tiny):
    """generate_steps, whose engine samples inside each step, draws the same tokens as
    generate_rows (the server's per-row sampling, generate.next_tokens) from the same seed."""
    from g3n.inference.generate import generate_rows

    model, tok = tiny
    prompt = tok.encode("Once", add_bos=True)
    for p in (SamplingParams(seed=3, max_new_tokens=12, temperature=1.5), SamplingParams(seed=4, max_new_tokens=12,
              repetition_penalty=1.3, top_k=0, top_p=0.9)):  # fmt: skip
        steps = [t for (t,) in generate_steps(model, [prompt], p)]
        rows = [t for (t,) in generate_rows(model, [prompt], [p])]
        assert steps == rows and len(set(steps)) > 3


def test_stops_on_end_of_turn(tiny):
    model, tok = tiny
    prompt = tok.encode_chat([{"role": "user", "content": "Hello!"}])
    steps = list(generate_steps(model, [prompt], SamplingParams(greedy=True, max_new_tokens=50), tok.stop_ids))
    assert len(steps) < 50 and steps[-1][0] == tok.end_of_turn_id
    text = "".join(stream_text(model, tok, prompt, SamplingParams(greedy=True, max_new_tokens=50)))
    assert text == tok.decode([s[0] for s in steps[:-1]])
    assert "<end_of_turn>" not in text


def test_finished_rows_yield_none(tiny):
    model, tok = tiny
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in ("Hi", "What is the largest planet?")]
    steps = list(generate_steps(model, prompts, SamplingParams(greedy=True, max_new_tokens=40), tok.stop_ids))
    first_stop = next(i for i, s in enumerate(steps) if s[0] in tok.stop_ids)
    assert all(s[0] is None for s in steps[first_stop + 1 :])


def test_streamer_holds_back_partial_utf8(tiny):
    _, tok = tiny
    ids = tok.encode("🙂!", add_bos=False)  # byte-fallback pieces for the emoji
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids]
    assert "".join(pieces) == "🙂!"
    assert all("\ufffd" not in p for p in pieces)


class _DecodeEverything:
    """The streamer as it was before decoding became incremental: decode every id at every token.
    The reference for what TextStreamer must return at each step."""

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


class _CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _with_normalizer(tok, **spec):
    """The same vocabulary with other normalizer settings: a dummy prefix or removed extra
    whitespace make SentencePiece drop the leading "▁" of a decode's first piece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from g3n.tokenizer import Tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    for key, value in spec.items():
        setattr(proto.normalizer_spec, key, value)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return Tokenizer(sp, dict(tok.special))


def _random_ids(tok, vocab_size, rng, length):
    """Token ids that stress decoding: any id of the vocabulary, byte-fallback pieces alone (lead
    and continuation bytes that may never form a character), pieces with a leading "▁", special
    and turn tokens, and the ids of multi-byte text."""
    sp = tok.sp
    byte = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    spaced = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("▁")]
    special = sorted(tok.id_to_special) + sorted(tok.turn_ids)
    utf8 = [sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0x99, 0x82, 0xC3, 0xA9, 0x41)]
    texts = ["é", "日本", "🙂", "👍🏽 ok", "naïve café", "日本語です", " a  b ", "\ufffd"]
    pools = [range(vocab_size), byte, spaced, special, utf8]
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.25:
            ids += tok.encode(rng.choice(texts), add_bos=False)
        else:
            ids.append(rng.choice(rng.choice(pools)))
    return ids[:length]


@pytest.mark.parametrize("normalizer", [{}, {"add_dummy_prefix": True}, {"remove_extra_whitespaces": True}])
def test_streamer_returns_what_decoding_everything_returns(tiny, normalizer):
    """At every token the same piece as decoding all ids so far; together, the decode of the reply."""
    import random

    model, tok = tiny
    tok = _with_normalizer(tok, **normalizer) if normalizer else tok
    rng = random.Random(0)
    for _ in range(300):
        ids = _random_ids(tok, model.config.vocab_size, rng, rng.randint(1, 40))
        reference, streamer = _DecodeEverything(tok), TextStreamer(tok)
        expected = [reference.push(i) for i in ids]
        pieces = [streamer.push(i) for i in ids]
        assert pieces == expected, ids
        if not tok.decode(ids).endswith("\ufffd"):
            assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("specials", [0, 400])
def test_streamer_decodes_each_id_a_few_times(tiny, specials):
    """A long reply costs linear decoding work: the server streams on one worker thread. Also with
    runs of special tokens (no text) in it."""
    import random

    _, tok = tiny
    rng = random.Random(0)
    words = ["The", " quick", " fox", " café", " 日本語", " 🙂🙂", " naïve", "\n", " über", " 👍🏽", "!"]
    ids: list[int] = []
    while len(ids) < 2000:  # whole words, so the reply ends on a whole character
        ids += tok.encode(rng.choice(words), add_bos=False)
        if specials and rng.random() < 0.01:
            ids += [tok.start_of_turn_id] * specials
    counting = _CountingTokenizer(tok)
    streamer = TextStreamer(counting)
    text = "".join(streamer.push(i) for i in ids)
    assert text == tok.decode(ids)
    assert counting.decoded < 20 * len(ids)


def test_prompt_too_long(tiny):
    model, _tok = tiny
    limit = model.config.max_position_embeddings
    with pytest.raises(G3nError, match=f"prompt of 5000 tokens does not fit the model's context of {limit}"):
        list(generate_steps(model, [[2] * 5000], SamplingParams()))
    with pytest.raises(G3nError, match=f"prompt of {limit} tokens"):  # no room left for a new token
        list(generate_steps(model, [[2] * limit], SamplingParams()))


def test_max_new_tokens_capped_by_the_context(tiny, monkeypatch):
    """Prompt + new tokens never exceed max_position_embeddings; each prompt has its own room."""
    model, tok = tiny
    prompts = [tok.encode("Once upon a time", add_bos=True), tok.encode("Hi", add_bos=True)]
    context = len(prompts[0]) + 4
    monkeypatch.setattr(model.config, "max_position_embeddings", context)
    params = SamplingParams(greedy=True, max_new_tokens=50)
    assert [len(x) for x in generate(model, prompts, params)] == [4, context - len(prompts[1])]
    monkeypatch.setattr(model.config, "max_position_embeddings", len(prompts[0]) + 1)
    assert [len(x) for x in generate(model, prompts[:1], params)] == [1]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.3, temperature=1.5),
     SamplingParams(top_k=0, top_p=0.9)],
)  # fmt: skip
def test_candidate_probs_equal_the_full_filter(params):
    """Sampling among the top-k candidates draws from exactly softmax(filter_logits)."""
    from g3n.inference.sampling import candidate_probs

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5000, generator=g) * 4
    seen = torch.rand(3, 5000, generator=g) < 0.01
    probs, ids = candidate_probs(logits, params, seen)
    full = probs if ids is None else torch.zeros(3, 5000).scatter(-1, ids, probs)
    torch.testing.assert_close(full, filter_logits(logits, params, seen).softmax(-1), atol=1e-6, rtol=1e-5)
