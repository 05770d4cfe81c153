"""OpenAI's chat-completions request, checked field by field.

Parsing is by hand rather than through a validation library so that every problem becomes
OpenAI's error body (errors.py) naming the field, which is what OpenAI clients show their users.
Unknown fields are ignored (clients send `user`, `metadata` and the like); fields we cannot honour
(n > 1, the legacy `functions`) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from g3n.errors import G3nError
from g3n.inference.sampling import SamplingParams
from g3n.serve.content import parse_messages
from g3n.serve.errors import APIError, bad
from g3n.tool_calls import Function, functions, render_history, with_tools


@dataclass
class ChatRequest:
    messages: list[dict]  # roles system/user/assistant; content: HF-style list of parts
    modalities: set[str]  # kinds of content present: "text", "image", "audio"
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: int | None = None  # None, or how many alternatives each token reports (top_logprobs)
    grammar: str | None = None  # what the reply must match (response_format; inference/grammar.py)
    model: str = ""  # the id asked for: the base model's or a served adapter's
    tools: ToolUse | None = None  # the functions it may call (tools, tool_choice)


@dataclass
class ToolUse:
    """What a request's `tools`, `tool_choice` and `parallel_tool_calls` ask (tool_calls.py)."""

    functions: list[Function]
    choice: str  # "auto", "none", "required", or the one function's name
    grammar: str  # the reply's grammar: text or calls as `choice` allows (with response_format's JSON)

    @property
    def forced(self) -> bool:
        """The reply must be a call (only a grammar can promise that)."""
        return self.choice not in ("auto", "none")

    @property
    def names(self) -> set[str]:
        return {f.name for f in self.functions}


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # 6.0: JSON writers in some languages send whole numbers so
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, not {_shown(value)}", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def integer_field(body: dict, name: str, lo: int, hi: int, default):
    """An integer field in [lo, hi]; a float with no fraction (6.0) counts as its integer."""
    return _number(body, name, lo, hi, default, integer=True)


def _shown(value) -> str:
    """A value for an error message: scalars as JSON (cut short), containers by kind."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Fields we cannot honour, with the value that means "not asked for".
_REFUSED = {
    "n": 1,
    "functions": None,  # the legacy form of tools
    "function_call": None,
}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body's JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat_request(body: dict, model_name: str | list[str], max_tokens_default: int, accept=None) -> ChatRequest:
    """Check a /v1/chat/completions body; sampling defaults are Google's for Gemma 3n. `accept`:
    called with the kinds of content before any media is decoded (content.parse_messages)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the id from GET /v1/models", "model")
    names = [model_name] if isinstance(model_name, str) else model_name  # the base model, then adapters
    if model not in names:
        raise APIError(404, f"The model '{model}' does not exist; this server runs {', '.join(map(repr, names))}",
                       param="model", code="model_not_found")  # fmt: skip
    for name, neutral in _REFUSED.items():
        value = body.get(name)
        if value is not None and value != neutral and value != []:
            hint = "; send 'tools' instead" if name.startswith("function") else ""
            raise bad(f"'{name}' is not supported by this server (only {json.dumps(neutral)}){hint}", name,
                      "unsupported")  # fmt: skip
    grammar, schema = _response_format(body.get("response_format"))
    tools = _tools(body, schema)

    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")

    # max_completion_tokens is the newer name; either may be given
    which = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, which, 1, 2**31 - 1, max_tokens_default, integer=True)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)
    top_p = _number(body, "top_p", 0, 1, 0.95)
    if top_p == 0:
        raise bad("'top_p' must be greater than 0", "top_p")
    params = SamplingParams(
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=top_p,
        top_k=_number(body, "top_k", 0, 2**31 - 1, 64, integer=True),  # extensions, as vLLM and llama.cpp take them
        min_p=_number(body, "min_p", 0, 1, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 100, 1.0),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0),  # OpenAI's range
        presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
        max_new_tokens=max_tokens,
        # every request gets a seed, so its draws never depend on what it is batched with
        seed=secrets.randbits(31) if seed is None else seed,
    )
    stop, bias, logprobs = _stop(body.get("stop")), _logit_bias(body.get("logit_bias")), _logprobs(body)
    messages, modalities = parse_messages(body.get("messages"), accept)  # last: media decoding takes time
    try:
        messages = merge_turns(render_history(messages))
        if tools is not None:
            messages = with_tools(messages, tools.functions)
    except G3nError as e:
        raise bad(str(e), "messages") from None
    return ChatRequest(messages, modalities, params, stop, bool(stream), bool(options.get("include_usage")), bias,
                       logprobs, grammar, model, tools)  # fmt: skip


def _tools(body: dict, prose_schema: dict | None) -> ToolUse | None:
    """OpenAI's tools, tool_choice and parallel_tool_calls; None when no tools are given."""
    from g3n.inference.grammar import tool_grammar

    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool) and parallel is not None:
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    try:
        funcs = functions(tools)
    except G3nError as e:
        raise bad(str(e), "tools") from None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name not in {f.name for f in funcs}:
            raise bad("'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name': N}} "
                      f"naming one of the tools, got {_shown(name or choice.get('type'))}", "tool_choice")  # fmt: skip
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise bad(f"'tool_choice' must be none, auto, required or a function, got {_shown(choice)}", "tool_choice")
    named = choice not in ("none", "auto", "required")
    callable_ = [f for f in funcs if f.name == choice] if named else funcs  # a named choice: that one only
    kind = choice if choice in ("none", "auto") else "required"
    try:
        # a named function is called once; otherwise several calls at once unless parallel_tool_calls is false
        text = tool_grammar(callable_, kind, parallel is not False and choice in ("auto", "required"), prose_schema)
    except G3nError as e:
        raise bad(str(e), "tools") from None
    return ToolUse(funcs, choice, text)


def merge_turns(messages: list[dict]) -> list[dict]:
    """Messages as Gemma's alternating turns, as leniently as OpenAI takes them: every system
    message joined in order into the one system prompt, consecutive messages of one role merged
    (a blank line between). A conversation that starts with the assistant is refused, naming it;
    one of system messages alone becomes the user's turn."""
    system = [m for m in messages if m["role"] == "system"]
    turns: list[dict] = []
    for n, msg in enumerate(messages):
        if msg["role"] == "system":
            continue
        if not turns and msg["role"] != "user":
            raise bad(f"messages[{n}]: the conversation must start with a user message (after any system "
                      f"messages), not {msg['role']}: Gemma's turns alternate user, model, user...", "messages")  # fmt: skip
        if turns and turns[-1]["role"] == msg["role"]:
            turns[-1] = {**msg, "content": _joined(turns[-1]["content"], msg["content"])}
        else:
            turns.append(msg)
    if not system:
        return turns
    prompt = system[0]["content"]
    for msg in system[1:]:
        prompt = _joined(prompt, msg["content"])
    return [{"role": "system" if turns else "user", "content": prompt}, *turns]


def _joined(a, b):
    """Two messages' content as one: strings or HF-style part lists, a blank line between texts."""
    if isinstance(a, str) and isinstance(b, str):
        return f"{a.strip()}\n\n{b.strip()}" if a.strip() and b.strip() else (a.strip() or b.strip())
    a = [{"type": "text", "text": a}] if isinstance(a, str) else list(a)
    b = [{"type": "text", "text": b}] if isinstance(b, str) else list(b)
    if a and b and a[-1]["type"] == "text" and b[0]["type"] == "text":  # one part: the blank line survives trimming
        return [*a[:-1], {"type": "text", "text": _joined(a[-1]["text"], b[0]["text"])}, *b[1:]]
    return a + b


def _response_format(fmt) -> tuple[str | None, dict | None]:
    """OpenAI's response_format: text (None), json_object (any JSON object) or json_schema (a value
    matching `json_schema.schema`, strict or not): the grammar the reply is decoded under, and its
    JSON schema."""
    if fmt is None:
        return None, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, None
    if kind not in ("json_object", "json_schema"):
        raise bad("'response_format' must be an object with 'type' text, json_object or json_schema",
                  "response_format")  # fmt: skip
    schema = None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("'response_format.json_schema' must be an object with the 'schema'", "response_format")
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise bad("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        if not isinstance(spec.get("strict", False), bool) and spec.get("strict") is not None:
            raise bad("'response_format.json_schema.strict' must be true or false", "response_format")
    from g3n.inference.grammar import ANY_OBJECT, json_grammar

    try:
        return json_grammar(schema), schema or ANY_OBJECT
    except G3nError as e:
        raise bad(f"'response_format': {e}", "response_format") from None


def _logit_bias(bias) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": value in [-100, 100]}; the ids are checked against the
    vocabulary when the request starts."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100
        if not ok:
            raise bad(f"'logit_bias' value for {key} must be a number in [-100, 100]", "logit_bias")
        out[token] = float(value)
    return out or None


def _logprobs(body: dict) -> int | None:
    """OpenAI's logprobs (bool) and top_logprobs (0..20, only with logprobs)."""
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise bad("'logprobs' must be true or false", "logprobs")
    top = _number(body, "top_logprobs", 0, 20, None, integer=True)
    if top is not None and not want:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


MAX_STOPS, MAX_STOP_CHARS = 4, 200  # OpenAI's count; stop strings are phrases, not documents


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    if longest := max((len(s) for s in stops if len(s) > MAX_STOP_CHARS), default=0):
        raise bad(f"'stop' strings may be at most {MAX_STOP_CHARS} characters, got one of {longest}", "stop")
    return stops
