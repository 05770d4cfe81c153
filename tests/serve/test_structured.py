"""Structured output (response_format json_object / json_schema) and OpenAI's penalties through
g3n serve, on the tiny model: whatever the model would say, the reply parses and validates, also
when max_tokens cuts it short (the value is closed early and finish_reason says "length")."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("llguidance")

from g3n.inference.backends import TorchEngine
from g3n.serve import Limits, create_app
from helpers import ServerThread

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = {
    "required fields": PERSON,
    "enum and array": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["color", "tags"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "x": {"type": "number"}},
                "required": ["name", "x"],
            },
            "people": {"type": "array", "items": {"$ref": "#/$defs/person"}},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "people", "ok"],
        "$defs": {"person": PERSON},
    },
}


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _ask(client, fmt, **kw):
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    return client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, **kw)


def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_replies_validate_every_time(client):
    """Each schema with two seeds and two budgets (60 tokens is tight for the nested one: its
    shortest value takes 51 of the tiny model's tokens), all at once: grammar rows batched."""
    asks = [(schema, seed, budget) for schema in SCHEMAS.values() for seed in (1, 2) for budget in (60, 100)]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        outs = list(pool.map(lambda a: _ask(client, _schema_format(a[0]), seed=a[1], max_tokens=a[2]), asks))
    for (schema, _, budget), out in zip(asks, outs, strict=True):
        choice = out.choices[0]
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason in ("stop", "length") and out.usage.completion_tokens <= budget


def test_json_object_and_streaming(client):
    for seed in (1, 2):
        out = _ask(client, {"type": "json_object"}, seed=seed, max_tokens=30)
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    pieces = _ask(client, _schema_format(PERSON), seed=5, max_tokens=40, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    whole = _ask(client, _schema_format(PERSON), seed=5, max_tokens=40).choices[0].message.content
    assert text == whole
    jsonschema.validate(json.loads(text), PERSON)


def test_a_long_budget_ends_at_the_grammars_end(client):
    """With room to spare the reply ends because the value is complete (finish "stop"), and a
    greedy reply is the same every time."""
    fmt = _schema_format({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                          "additionalProperties": False})  # fmt: skip
    out = [_ask(client, fmt, temperature=0, max_tokens=100).choices[0] for _ in range(2)]
    assert out[0].finish_reason == "stop" and json.loads(out[0].message.content) in ({"ok": True}, {"ok": False})
    assert out[0].message.content == out[1].message.content


def test_the_sdks_parse_fills_a_pydantic_model(client):
    """The SDK refuses to parse a reply whose finish is "length", so the model here has no free
    text or numbers (which the tiny model never ends by itself): it completes on its own."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    class Answer(pydantic.BaseModel):
        ok: bool
        color: Literal["red", "green", "blue"]
        sizes: list[Literal["S", "M", "L"]] = pydantic.Field(max_length=2)

    for seed in (3, 4):
        out = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Answer?"}],
                                            response_format=Answer, seed=seed, max_tokens=100)  # fmt: skip
        assert out.choices[0].finish_reason == "stop" and isinstance(out.choices[0].message.parsed, Answer)


def test_refusals_name_the_field(client):
    openai = pytest.importorskip("openai")
    bad = [
        ({"type": "xml"}, "type"),
        ({"type": "json_schema"}, "json_schema"),
        (_schema_format({"type": "object", "properties": {"a": {"type": "strng"}}}), "cannot be used"),
    ]
    for fmt, words in bad:
        with pytest.raises(openai.BadRequestError, match=words) as e:
            _ask(client, fmt)
        assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="between -2 and 2"):
        _ask(client, {"type": "text"}, frequency_penalty=2.5)


def test_penalties_are_honoured_not_refused(client, engine):
    """The server's reply with penalties is g3n's own generation with them, which differs from
    the reply without; zero penalties change nothing. The end tokens are biased away, so the
    tiny model goes on long enough to repeat itself."""
    from g3n.inference.engine import Engine, Request
    from g3n.inference.sampling import SamplingParams

    content = "Say 1 1 1 1 1"
    no_end = {str(t): -100 for t in engine.tok.stop_ids}

    def ask(**kw):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                             temperature=0, max_tokens=24, logit_bias=no_end, **kw)  # fmt: skip
        return out.choices[0].message.content

    def direct(**kw):
        ids = engine.encode_chat([{"role": "user", "content": content}])
        params = SamplingParams(greedy=True, max_new_tokens=24, **kw)
        bias = {int(k): v for k, v in no_end.items()}
        return engine.tok.decode(
            [t.token for t in Engine(engine.model, 1).generate(Request(ids, params, logit_bias=bias))]
        )

    plain = ask()
    assert ask(frequency_penalty=0, presence_penalty=0) == plain
    for value in (2.0, -2.0):
        penalties = {"frequency_penalty": value, "presence_penalty": value}
        assert ask(**penalties) == direct(**penalties) != plain


def test_streamed_logprobs_match_the_whole_reply(client):
    """Each streamed chunk carries its tokens' logprobs: together, those of the whole reply."""
    messages = [{"role": "user", "content": "Hi"}]
    kw = {"model": "tiny", "messages": messages, "seed": 2, "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [t for c in chunks for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]  # the second reuses the first's prefill:
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-4)  # float32 sums
    assert all(len(t.top_logprobs) == 3 for t in streamed)


def test_logprobs_under_a_grammar_are_the_models_own(tiny):
    """A constrained row's tokens report the model's own log-probabilities (before the mask), as
    every other row's do."""
    import torch

    from g3n.inference.grammar import json_grammar
    from g3n.inference.sampling import SamplingParams

    model, tok = tiny
    backend = TorchEngine(model, tok, "tiny", max_batch=2)
    seen, step = [], backend.engine.step
    backend.engine.step = lambda: seen.extend(out := step()) or out
    ids = tok.encode_chat([{"role": "user", "content": "JSON?"}])
    backend.submit(ids, SamplingParams(seed=1, max_new_tokens=30), logprobs=2, grammar=json_grammar(PERSON))
    pieces = []
    while backend.engine.busy:
        pieces += backend.step()
    assert pieces[-1].finish == "length"  # closed early: the tiny model never ends a string itself
    jsonschema.validate(json.loads("".join(p.text for p in pieces)), PERSON)
    tokens = [t.token for t in seen]
    with torch.no_grad():
        expected = model(torch.tensor([ids + tokens[:-1]]))[0, len(ids) - 1 :].float().log_softmax(-1)
    for t, row in zip(seen, expected, strict=True):
        assert abs(t.logprob - row[t.token].item()) < 1e-4
        assert [i for i, _ in t.top] == row.topk(2).indices.tolist()


class _NoGrammars:
    """An engine that cannot constrain its output (as llama.cpp's, here): never reached."""

    name, modalities, context_length, max_batch, grammars = "gguf", frozenset({"text"}), 64, 1, False

    def prepare(self, messages):
        return [2, 3], None

    def submit(self, *args):
        raise AssertionError("refused before it is queued")

    def step(self):
        return []

    def cancel(self, handle):
        pass


def test_an_engine_without_grammars_refuses_response_format_and_penalties():
    openai = pytest.importorskip("openai")
    from g3n.errors import G3nError
    from g3n.inference.backends import GGUFEngine
    from g3n.inference.sampling import SamplingParams

    with ServerThread(create_app(_NoGrammars(), Limits())) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="needs g3n's engine") as e:
                client.chat.completions.create(model="gguf", messages=[{"role": "user", "content": "Hi"}],
                                               response_format={"type": "json_object"}, stream=stream)  # fmt: skip
            assert e.value.body["param"] == "response_format" and e.value.body["code"] == "unsupported"
    gguf = object.__new__(GGUFEngine)  # its submit's checks, without a GGUF file
    with pytest.raises(G3nError, match="frequency_penalty needs g3n's engine"):
        gguf.submit([2, 3], SamplingParams(frequency_penalty=0.5))


def test_the_vocabulary_is_sentencepieces_bytes(tiny):
    """g3n's own tokens of a valid reply (byte-fallback pieces, a multi-byte character spelled in
    bytes, `▁` pieces) are each allowed in turn; turn markers and control tokens never are, and
    once the value is complete only the end tokens are."""
    import torch

    from g3n.inference.grammar import GrammarProcessor, json_grammar, vocabulary

    model, tok = tiny
    vocab = vocabulary(tok, model.config.vocab_size)
    assert vocab.byte_ids[ord("{")] == tok.sp.piece_to_id("<0x7B>")
    text = '{"name": "Zoë the 2nd 🙂", "age": 41}'
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text and any(tok.sp.is_byte(i) for i in ids)
    grammar = GrammarProcessor(vocab, json_grammar(PERSON), tok.stop_ids)
    never = [tok.start_of_turn_id, tok.end_of_turn_id, tok.bos_id, tok.pad_id]
    logits = torch.zeros(model.config.vocab_size)
    for n, token in enumerate(ids):
        allowed = grammar(ids[:n], logits).isfinite()
        assert allowed[token], (n, tok.sp.id_to_piece(token))
        assert not allowed[never].any()
    done = grammar(ids, logits).isfinite().nonzero().flatten().tolist()
    assert sorted(done) == sorted(tok.stop_ids)
