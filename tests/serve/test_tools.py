"""Tool calls through g3n serve on the tiny model (tool_calls.py's format): the prompt is the chat
template's, every call the grammar allows parses and validates against its function's schema,
streamed deltas add up to the same calls, and real clients (the openai SDK's tool loop, LangChain's
bind_tools and with_structured_output in its three methods) work."""

from __future__ import annotations

import json
from typing import Literal

import pytest

pytest.importorskip("starlette")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from g3n.tokenizer import format_chat
from g3n.tool_calls import CallStream, parse_calls

# Enumerations and booleans only: the tiny model ends a call by itself (free text it would not).
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": WEATHER_PARAMS}}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = [WEATHER, NOW]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "now": {"type": "object", "properties": {}, "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def token_of(engine):
    """The id of the token that writes this one ASCII character (to bias a reply towards a call or
    away from one): its piece, else its byte-fallback piece."""

    def of(ch: str) -> int:
        sp = engine.tok.sp
        return next(i for i in (sp.piece_to_id(ch), sp.piece_to_id(f"<0x{ord(ch):02X}>")) if i != sp.unk_id())

    return of


def _valid(calls):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_the_prompt_is_the_chat_templates():
    """What the server feeds the model is format_chat with `tools` (which the exports' Jinja
    template renders the same: tests/export/test_chat_template.py), history included."""
    from g3n.serve.schema import parse_chat_request

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    req = parse_chat_request({"model": "tiny", "messages": messages, "tools": TOOLS}, "tiny", 16)
    assert format_chat(req.messages) == format_chat(messages, tools=TOOLS)
    text = format_chat(req.messages)
    assert text.count('{"name": "get_weather", "description"') == 1 and "```tool_output\n21 C\n```" in text
    assert '{"name": "get_weather", "parameters": {"city": "Rome"}}<end_of_turn>' in text


def test_required_and_named_calls_validate(client):
    for seed in (1, 2, 3):
        out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                             seed=seed, max_tokens=200)  # fmt: skip
        choice = out.choices[0]
        # "length": a list of calls the model kept adding to, closed before max_tokens
        assert choice.message.content is None and choice.finish_reason in ("tool_calls", "length")
        _valid(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "now"}}
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, seed=4,
                                         max_tokens=200)  # fmt: skip
    calls = out.choices[0].message.tool_calls
    assert (
        out.choices[0].finish_reason == "tool_calls"
        and [c.function.name for c in calls] == ["now"]
        and json.loads(calls[0].function.arguments) == {}
    )


def test_auto_gives_text_or_calls_and_none_gives_text(client, token_of):
    """Under auto the model picks: pushed towards "{" it calls, pushed away it writes text (which
    never opens with "{" or "["); under none it writes text even when pushed towards a call."""
    towards = {str(token_of("{")): 100}
    away = {str(token_of("{")): -100, str(token_of("[")): -100}
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, logit_bias=towards, seed=5,
                                         max_tokens=200)  # fmt: skip
    assert out.choices[0].finish_reason == "tool_calls"
    _valid(out.choices[0].message.tool_calls)
    for choice, bias in (("auto", away), ("none", towards)):
        out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                             logit_bias=bias, seed=6, max_tokens=12)  # fmt: skip
        message = out.choices[0].message
        assert not message.tool_calls and message.content and message.content.lstrip()[0] not in "{["


def test_parallel_calls_and_a_cut_call(client, token_of):
    """A list of calls when the reply opens with "[" (parallel_tool_calls, the default); one call
    only with parallel_tool_calls false; a call cut by max_tokens is closed early and still valid."""
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         logit_bias={str(token_of("[")): 100}, seed=7, max_tokens=200)  # fmt: skip
    assert len(out.choices[0].message.tool_calls) >= 2
    _valid(out.choices[0].message.tool_calls)
    for seed in (8, 9):
        out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, logit_bias={str(token_of("[")): 100},
                                             seed=seed, max_tokens=200)  # fmt: skip
        assert len(out.choices[0].message.tool_calls) == 1
    note = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"], "additionalProperties": False}}}  # fmt: skip
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=[note], tool_choice="required", seed=10,
                                         max_tokens=60)  # fmt: skip
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens <= 60
    assert call.function.name == "note" and isinstance(json.loads(call.function.arguments)["text"], str)


def test_streamed_calls_add_up_to_the_same_calls(client, token_of):
    kw = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 11, "max_tokens": 200,
          "logit_bias": {str(token_of("[")): 100}}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        assert chunk.choices[0].delta.content in (None, "")
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": None, "arguments": "", "id": None})
            call["id"] = delta.id or call["id"]
            call["name"] = (delta.function.name if delta.function else None) or call["name"]
            call["arguments"] += (delta.function.arguments if delta.function else None) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason and len(calls) >= 2
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_call_stream_splits_anywhere():
    """Deltas from the reply cut at every position rebuild the calls; without a grammar (llama.cpp)
    calls are read at the end, and text that only looks like a call stays text."""
    text = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "R\\"o}m", "x": [1]}}]'
    expected = [(c.name, c.arguments) for c in parse_calls(text, {"now", "get_weather"})]
    assert expected == [("now", "{}"), ("get_weather", '{"city": "R\\"o}m", "x": [1]}')]
    for cut in range(1, len(text)):
        stream = CallStream({"now", "get_weather"})
        deltas = stream.push(text[:cut]) + stream.push(text[cut:])
        deltas += stream.finish()[0]
        args: dict[int, list] = {}
        for d in deltas:
            for t in d["tool_calls"]:
                entry = args.setdefault(t["index"], [None, ""])
                entry[0] = t["function"].get("name") or entry[0]
                entry[1] += t["function"].get("arguments", "")
        assert [tuple(v) for v in args.values()] == expected, cut
    unstreamed = CallStream({"now"}, streamed=False)
    assert unstreamed.push('{ "name" : "now",\n "parameters": {} }') == []
    deltas, calls = unstreamed.finish()
    assert [c.name for c in calls] == ["now"] and deltas[0]["tool_calls"][0]["function"]["arguments"] == "{}"
    looks = CallStream({"now"})
    looks.push('{"name": "later", "parameters": {}}')
    assert looks.finish() == ([{"content": '{"name": "later", "parameters": {}}'}], None)


def test_the_openai_sdks_tool_loop(client):
    """Ask, get a call, send its result back as a `tool` message (the SDK's own message object as
    the assistant turn), get the answer."""
    messages = list(ASK)
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, seed=12, max_tokens=200)  # fmt: skip
    message = out.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})})
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none", seed=13,
                                         max_tokens=12)  # fmt: skip
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


def test_langchain_bind_tools_and_structured_output(server):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        """The weather in a city."""

        city: Literal["Paris", "Rome", "Oslo"]
        metric: bool

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", max_tokens=200, seed=14,
                     max_retries=0)  # fmt: skip
    bound = llm.bind_tools([GetWeather], tool_choice="required")
    reply = bound.invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "GetWeather"
    GetWeather(**reply.tool_calls[0]["args"])
    follow = bound.bind(tool_choice="none").invoke(
        ["What is the weather in Paris?", reply, ToolMessage("21 C", tool_call_id=reply.tool_calls[0]["id"])]
    )
    assert isinstance(follow.content, str) and follow.content
    for method in ("function_calling", "json_schema"):
        assert isinstance(llm.with_structured_output(GetWeather, method=method).invoke("Weather?"), GetWeather)
    assert isinstance(llm.with_structured_output(None, method="json_mode").invoke("Weather as JSON?"), dict)


def test_refusals_name_the_field(client):
    openai = pytest.importorskip("openai")
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools", "letters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "other"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "always"),
        ({"functions": [{"name": "f"}]}, "functions", "send 'tools'"),
    ]
    for kw, param, words in bad:
        with pytest.raises(openai.BadRequestError, match=words) as e:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **kw)
        assert e.value.body["param"] == param, kw
    messages = [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {}}]}]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.tool_calls\[0\]"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
