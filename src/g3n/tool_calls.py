"""Tool calls for Gemma 3n, which has no tool tokens: one prompt format and the parser that reads
the calls back (inference/grammar.py's `tool_grammar` is the grammar they are decoded under).

The format is the JSON variant of Google's function-calling guide for Gemma (ai.google.dev/gemma/
docs/capabilities/function-calling): the instructions and the functions' JSON definitions open the
first user turn, and the model answers a call with `{"name": ..., "parameters": {...}}` alone.

    first user turn   PREAMBLE + the functions, one JSON object a line, in [ ] + "\\n\\n"
                      + the system prompt + "\\n\\n" (if any) + the user's text
    assistant turn    [its text + "\\n"] + {"name": "f", "parameters": {...}}
                      (several calls: [{"name": ...}, {"name": ...}])
    tool results      one user turn: a ```tool_output block per result, in order, "\\n" between

JSON is written as Python's json.dumps writes it (", " and ": ", no ASCII escaping), the way the
grammar makes the model write it. tokenizer.CHAT_TEMPLATE renders the same text in Jinja.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from g3n.errors import G3nError

PREAMBLE = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "To call several functions at once, put the calls in a JSON list.\n\n"
    "You SHOULD NOT include any other text in the response if you call a function\n"
)
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict | None

    def definition(self) -> str:
        spec = {"name": self.name}
        if self.description is not None:
            spec["description"] = self.description
        if self.parameters is not None:
            spec["parameters"] = self.parameters
        return dumps(spec)


def functions(tools, where: str = "tools") -> list[Function]:
    """The functions of OpenAI's `tools` ({"type": "function", "function": {...}}; the bare
    {"name": ...} that some clients send is taken too). Errors name the field."""
    if not isinstance(tools, list):
        raise G3nError(f"'{where}' must be a list of tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise G3nError(f"{at} must be an object")
        if tool.get("type", "function") != "function":
            raise G3nError(f"{at}.type must be 'function', got {tool.get('type')!r}")
        spec = tool.get("function", tool if "name" in tool else None)
        if not isinstance(spec, dict):
            raise G3nError(f"{at}.function must be an object with the function's 'name'")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise G3nError(f"{at}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise G3nError(f"{at}.function.name: {name!r} is defined twice")
        seen.add(name)
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise G3nError(f"{at}.function.description must be a string")
        parameters = spec.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise G3nError(f"{at}.function.parameters must be a JSON schema object")
        out.append(Function(name, description, parameters))
    return out


def tools_text(funcs: list[Function]) -> str:
    """The preamble and the definitions that open the first user turn."""
    return PREAMBLE + "[\n" + ",\n".join(f.definition() for f in funcs) + "\n]"


def call_text(calls: list[dict], where: str) -> str:
    """An assistant message's `tool_calls` as the model writes them. `arguments` as OpenAI sends it
    (the JSON text this server returned) goes in unchanged; an object is written as JSON."""
    if not isinstance(calls, list) or not calls:
        raise G3nError(f"{where}.tool_calls must be a non-empty list")
    out = []
    for i, call in enumerate(calls):
        at = f"{where}.tool_calls[{i}]"
        spec = call.get("function") if isinstance(call, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not NAME.fullmatch(spec["name"]):
            raise G3nError(f"{at} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
        args = spec.get("arguments", "{}")
        if isinstance(args, dict):
            args = dumps(args)
        elif not isinstance(args, str):
            raise G3nError(f"{at}.function.arguments must be a JSON string or an object")
        out.append('{"name": "' + spec["name"] + '", "parameters": ' + args.strip() + "}")
    return out[0] if len(out) == 1 else "[" + ", ".join(out) + "]"


def _text(content, where: str) -> str:
    """A tool result's or a calling assistant's text: a string, or text parts trimmed and joined."""
    if content is None or isinstance(content, str):
        return (content or "").strip()
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")).strip() for p in content)
    raise G3nError(f"{where}.content must be a string or a list of text parts")


def render_history(messages: list[dict]) -> list[dict]:
    """Messages with the tool-call turns written as Gemma text: an assistant message's `tool_calls`
    after its text, each run of `tool` messages one user message of ```tool_output blocks."""
    out: list[dict] = []
    for n, msg in enumerate(messages):
        where = f"messages[{n}]"
        if msg.get("role") == "tool":
            block = "```tool_output\n" + _text(msg.get("content"), where) + "\n```"
            if out and out[-1].get("role") == "tool":
                out[-1] = {"role": "tool", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "tool", "content": block})
        elif msg.get("tool_calls"):
            text = _text(msg.get("content"), where)
            calls = call_text(msg["tool_calls"], where)
            out.append({"role": msg.get("role"), "content": text + "\n" + calls if text else calls})
        else:
            out.append(msg)
    return [{"role": "user", "content": m["content"]} if m.get("role") == "tool" else m for m in out]


def with_tools(messages: list[dict], funcs: list[Function]) -> list[dict]:
    """Messages with the tools' text at the head of the system prompt (one is made if none)."""
    if not funcs:
        return messages
    head = tools_text(funcs)
    if not messages or messages[0].get("role") != "system":
        return [{"role": "system", "content": head}, *messages]
    content = messages[0].get("content")
    if isinstance(content, list):
        content = _text(content, "messages[0]")  # as format_chat joins text parts
    if not isinstance(content, str):
        raise G3nError("messages[0].content must be a string or text parts when tools are given")
    return [{"role": "system", "content": head + "\n\n" + content}, *messages[1:]]


def fold(messages: list[dict], tools=None) -> list[dict]:
    """Messages and tools as plain system/user/assistant messages (format_chat's `tools`)."""
    return with_tools(render_history(messages), functions(tools) if tools else [])


# Reading calls back -------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    arguments: str  # the parameters' JSON text, as the model wrote it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"(' + NAME.pattern + r')"\s*,\s*"parameters"\s*:\s*')
_CLOSE = re.compile(r"\s*\}")


def parse_calls(text: str, names: set[str]) -> list[Call] | None:
    """The calls in a reply, or None when it is not a call of the given functions."""
    text = text.strip()
    listed = text.startswith("[")
    calls, at = [], int(listed)
    while True:
        call = _parse_one(text, at, names)
        if call is None:
            return None
        calls.append(call[0])
        at = call[1]
        while at < len(text) and text[at].isspace():
            at += 1
        if not listed:
            return calls if at == len(text) else None
        if text.startswith(",", at):
            at += 1
            continue
        return calls if text[at:].strip() == "]" else None


def _parse_one(text: str, at: int, names: set[str]) -> tuple[Call, int] | None:
    head = _HEAD.match(text, at)
    if head is None or head.group(1) not in names:
        return None
    try:
        value, end = json.JSONDecoder().raw_decode(text, head.end())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    close = _CLOSE.match(text, end)
    if close is None:
        return None
    return Call(head.group(1), text[head.end() : end]), close.end()


class CallStream:
    """A reply's text in, OpenAI's deltas out: text as `content`, or, once the reply opens with a
    call, `tool_calls` deltas (the name first, then the arguments as they are written).

    `streamed`: the reply is decoded under the tools' grammar, so calls are written exactly as the
    format writes them and their arguments stream; otherwise (a runtime without grammars) the
    calls are read once the reply has ended."""

    def __init__(self, names: set[str], streamed: bool = True):
        self.names, self.streamed = names, streamed
        self.buffer = ""
        self.mode: str | None = None  # None: undecided, "text", or "calls"
        self.calls: list[Call] = []  # the calls streamed so far
        self._sent = 0  # characters of the buffer already sent (as content or arguments) or skipped
        self._in_args = False  # inside a call's arguments object
        self._depth, self._in_string, self._escaped = 0, False, False

    def push(self, piece: str) -> list[dict]:
        self.buffer += piece
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head:
                return []
            self.mode = "calls" if head[0] in "[{" else "text"
        if self.mode == "text":
            out, self._sent = self.buffer[self._sent :], len(self.buffer)
            return [{"content": out}] if out else []
        return self._scan() if self.streamed else []

    def _scan(self) -> list[dict]:
        out = []
        while True:
            if not self._in_args:
                rest = self.buffer[self._sent :]
                head = _HEAD.match(rest, len(rest) - len(rest.lstrip("[]}, \n")))
                if head is None or head.group(1) not in self.names:
                    return out
                self._sent += head.end()
                self._in_args, self._depth = True, 0
                self.calls.append(Call(head.group(1), ""))
                call, index = self.calls[-1], len(self.calls) - 1
                header = {"index": index, "id": call.id, "type": "function"}
                out.append({"tool_calls": [header | {"function": {"name": call.name, "arguments": ""}}]})
            if self._depth == 0:  # the space between "parameters": and the object
                rest = self.buffer[self._sent :]
                self._sent += len(rest) - len(rest.lstrip())
            end = self._args_end()
            upto = len(self.buffer) if end is None else end
            if upto > self._sent:
                chunk = self.buffer[self._sent : upto]
                self.calls[-1].arguments += chunk
                out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": chunk}}]})
            self._sent = upto
            if end is None:
                return out
            self._in_args = False

    def _args_end(self) -> int | None:
        """Where the arguments object being written ends (exclusive); None: not yet."""
        for i in range(self._sent, len(self.buffer)):
            c = self.buffer[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None

    def finish(self) -> tuple[list[dict], list[Call] | None]:
        """(the deltas still to send, the calls; None when the reply was text)."""
        if self.mode != "calls":
            rest = self.buffer[self._sent :]
            return ([{"content": rest}] if rest else []), None
        calls = parse_calls(self.buffer, self.names)
        if calls is None:
            # not a call after all (a runtime without grammars): what was held back is the text;
            # calls already streamed stay as written (a reply cut by max_tokens)
            return ([], self.calls) if self.calls else ([{"content": self.buffer}], None)
        first = len(self.calls)
        deltas = [{"tool_calls": [{"index": i, **c.openai()}]} for i, c in enumerate(calls) if i >= first]
        self.calls += calls[first:]
        return deltas, self.calls
