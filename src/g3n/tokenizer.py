"""Gemma's SentencePiece tokenizer, the chat template, and the single-BOS rule.

Gemma 3n chat turns look like

    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>

Assistant turns are called `model`; a system message is folded into the first user turn followed by
a blank line. Exactly one `<bos>` starts every sequence we encode: a prompt that already starts with
`<bos>` (as text or as an id) does not get a second one, because two quietly degrade the output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from g3n.errors import G3nError

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Where an image or audio clip sits in a chat prompt, as Google's template writes it; media.py
# expands each into the full boi/soft tokens/eoi sequence.
IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image_soft_token>", "<audio_soft_token>"
MEDIA_PARTS = {"image": IMAGE_PLACEHOLDER, "audio": AUDIO_PLACEHOLDER}
ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    def __init__(self, sp: spm.SentencePieceProcessor, added_tokens: dict[str, int] | None = None):
        self.sp = sp
        # Tokens that plain SentencePiece will not match in text (control symbols such as <bos>)
        # or that live outside its vocabulary (added tokens), matched before SentencePiece runs.
        self.special: dict[str, int] = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        self.special.update(added_tokens or {})
        self.id_to_special = {i: t for t, i in self.special.items()}
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), max(sp.pad_id(), 0)
        self.start_of_turn_id = self.token_id(START_OF_TURN)
        self.end_of_turn_id = self.token_id(END_OF_TURN)
        self.turn_ids = {self.start_of_turn_id, self.end_of_turn_id}
        # text that encodes to a control token, a turn marker or a media placeholder: never user text
        markers = [*self.special, START_OF_TURN, END_OF_TURN, *MEDIA_PARTS.values()]
        self._reserved = re.compile("|".join(map(re.escape, sorted(set(markers), key=len, reverse=True))))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.model"
        if not path.is_file():
            raise G3nError(f"{path}: tokenizer.model not found (Gemma's SentencePiece model is required)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise G3nError(f"{path}: not a SentencePiece model ({e})") from None
        return cls(sp, _added_tokens(model_dir, sp))

    def token_id(self, token: str) -> int:
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise G3nError(f"tokenizer has no token {token!r}")
        return i

    @property
    def stop_ids(self) -> set[int]:
        """Instruction-tuned Gemma stops on eos or <end_of_turn>."""
        return {self.eos_id, self.end_of_turn_id}

    # ---- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text become their ids.

        With add_bos the result starts with exactly one BOS, whether or not the text had one.
        """
        check_text(text)
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if not part:
                continue
            if part in self.special:
                ids.append(self.special[part])
            else:
                ids.extend(self.sp.encode(part))
        return with_single_bos(ids, self.bos_id) if add_bos else ids

    def reserved_text(self, text: str) -> str | None:
        """The first special token's text (control token, turn marker, media placeholder) in `text`."""
        m = self._reserved.search(text)
        return m.group() if m else None

    def is_special(self, i: int) -> bool:
        """Control, added and turn-marker tokens: not part of the readable text."""
        n = self.sp.get_piece_size()
        return i in self.id_to_special or i >= n or self.sp.is_control(i) or i in self.turn_ids

    def decode(self, ids, skip_special: bool = True) -> str:
        out, run, n = [], [], self.sp.get_piece_size()
        for i in map(int, ids):
            if self.is_special(i):
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.id_to_special.get(i) or (self.sp.id_to_piece(i) if i < n else f"<id {i}>"))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat -----------------------------------------------------------------------------
    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return format_chat(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.format_chat(messages, add_generation_prompt), add_bos=True)


def format_chat(messages: list[dict], add_generation_prompt: bool = True, media: bool = False, tools=None) -> str:
    """The Gemma 3n chat template, without the leading <bos> (encode adds it).

    Content may be a string or a list of parts ({"type": "text"|"image"|"audio", ...}); with
    `media`, image and audio parts become placeholders, otherwise they are an error. `tools`
    (OpenAI's), role `tool` messages and assistant `tool_calls` are written in g3n's tool-call
    format (tool_calls.py)."""
    messages = list(messages)
    if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages if isinstance(m, dict)):
        from g3n.tool_calls import fold

        messages = fold(messages, tools)
    prefix, first = "", 0  # first: the index of the first turn in the messages given (errors name it)
    if messages and messages[0].get("role") == "system":
        prefix, first = _content(messages.pop(0), 0, media) + "\n\n", 1  # not trimmed, as in Google's template
    text = []
    for n, msg in enumerate(messages):
        at = n + first
        role = ROLES.get(msg.get("role"))
        if role is None:
            allowed = "user, assistant or tool" if at else "system, user, assistant or tool"  # system: first only
            raise G3nError(f"message {at}: unknown role {msg.get('role')!r} (use {allowed})")
        expected = "user" if n % 2 == 0 else "model"
        if role != expected:
            raise G3nError(f"message {at}: expected a {expected} turn (turns alternate user/assistant)")
        body = (prefix if n == 0 else "") + _content(msg, at, media).strip()
        text.append(f"{START_OF_TURN}{role}\n{body}{END_OF_TURN}\n")
    if add_generation_prompt:
        text.append(f"{START_OF_TURN}model\n")
    return "".join(text)


# format_chat as a Jinja template, for exports (HF: chat_template.jinja; GGUF: tokenizer.chat_template;
# transformers and llama.cpp render it): string content or parts (text trimmed each, image/audio as the
# placeholders), the system prompt folded into the first user turn, one BOS, the same refusals, and
# tool_calls.py's tool-call format (`tools`, role `tool`, assistant `tool_calls`; JSON written by the
# `json` macro as json.dumps writes it, since Jinja's own `tojson` differs between runtimes).
CHAT_TEMPLATE = r"""{%- macro json(v) -%}
    {%- if v is string -%}
        {{- '"' ~ (v | replace('\\', '\\\\') | replace('"', '\\"') | replace('\n', '\\n') | replace('\r', '\\r') | replace('\t', '\\t')) ~ '"' -}}
    {%- elif v is mapping -%}
        {{- '{' -}}
        {%- for k in v -%}
            {{- json(k | string) ~ ': ' ~ json(v[k]) -}}
            {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif v is sameas true -%}
        {{- 'true' -}}
    {%- elif v is sameas false -%}
        {{- 'false' -}}
    {%- elif v is none -%}
        {{- 'null' -}}
    {%- elif v is number -%}
        {{- v -}}
    {%- else -%}
        {{- '[' -}}
        {%- for x in v -%}
            {{- json(x) -}}
            {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro text(content, n) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- elif content is none -%}
    {%- elif content is defined and content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' and part['text'] is string -%}
                {{- part['text'] | trim -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<image_soft_token>' -}}
            {%- elif part['type'] == 'audio' -%}
                {{- '<audio_soft_token>' -}}
            {%- else -%}
                {{- raise_exception('message ' ~ n ~ ', part ' ~ loop.index0 ~ ': unknown content part (use text, image or audio)') -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception('message ' ~ n ~ ": 'content' must be a string") -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro call(c) -%}
    {%- set args = c['function']['arguments'] if c['function']['arguments'] is defined else '{}' -%}
    {{- '{"name": "' ~ c['function']['name'] ~ '", "parameters": ' ~ (args | trim if args is string else json(args)) ~ '}' -}}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(prefix='', turn=0) -%}
{%- if tools -%}
    {%- set ns.prefix = 'You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n{"name": function name, "parameters": dictionary of argument name and its value}\nTo call several functions at once, put the calls in a JSON list.\n\nYou SHOULD NOT include any other text in the response if you call a function\n[\n' -%}
    {%- for tool in tools -%}
        {%- set spec = tool['function'] if tool['function'] is defined else tool -%}
        {%- set ns.prefix = ns.prefix ~ '{"name": ' ~ json(spec['name']) -%}
        {%- if spec['description'] is defined and spec['description'] is not none -%}
            {%- set ns.prefix = ns.prefix ~ ', "description": ' ~ json(spec['description']) -%}
        {%- endif -%}
        {%- if spec['parameters'] is defined and spec['parameters'] is not none -%}
            {%- set ns.prefix = ns.prefix ~ ', "parameters": ' ~ json(spec['parameters']) -%}
        {%- endif -%}
        {%- set ns.prefix = ns.prefix ~ '}' ~ (',\n' if not loop.last else '\n]\n\n') -%}
    {%- endfor -%}
{%- endif -%}
{%- set loop_messages = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set content = messages[0]['content'] -%}
    {%- if content is string -%}
        {%- set ns.prefix = ns.prefix ~ content -%}
    {%- else -%}
        {%- set ns.prefix = ns.prefix ~ text(content, 0) -%}
    {%- endif -%}
    {%- set ns.prefix = ns.prefix ~ '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set n = loop.index0 -%}
    {%- if message['role'] == 'tool' or message['role'] == 'user' -%}
        {%- set role = 'user' -%}
    {%- elif message['role'] == 'assistant' or message['role'] == 'model' -%}
        {%- set role = 'model' -%}
    {%- else -%}
        {{- raise_exception('message ' ~ n ~ ': unknown role ' ~ message['role'] ~ ' (use system, user, assistant or tool)') -}}
    {%- endif -%}
    {%- set continued = message['role'] == 'tool' and loop.previtem is defined and loop.previtem['role'] == 'tool' -%}
    {%- if not continued -%}
        {%- if (role == 'user') != (ns.turn % 2 == 0) -%}
            {{- raise_exception('message ' ~ n ~ ': expected a ' ~ ('user' if ns.turn % 2 == 0 else 'model') ~ ' turn (turns alternate user/assistant)') -}}
        {%- endif -%}
        {{- '<start_of_turn>' ~ role ~ '\n' ~ (ns.prefix if ns.turn == 0 else '') -}}
    {%- endif -%}
    {%- if message['role'] == 'tool' -%}
        {{- ('\n' if continued else '') ~ '```tool_output\n' ~ text(message['content'], n) ~ '\n```' -}}
    {%- elif message['tool_calls'] -%}
        {%- set said = text(message['content'] if message['content'] is defined else none, n) -%}
        {{- said ~ ('\n' if said else '') -}}
        {%- if message['tool_calls'] | length == 1 -%}
            {{- call(message['tool_calls'][0]) -}}
        {%- else -%}
            {{- '[' -}}
            {%- for c in message['tool_calls'] -%}
                {{- call(c) ~ (', ' if not loop.last else '') -}}
            {%- endfor -%}
            {{- ']' -}}
        {%- endif -%}
    {%- else -%}
        {%- if message['content'] is none or message['content'] is not defined -%}
            {{- raise_exception('message ' ~ n ~ ": 'content' must be a string") -}}
        {%- endif -%}
        {{- text(message['content'], n) -}}
    {%- endif -%}
    {%- if not (message['role'] == 'tool' and loop.nextitem is defined and loop.nextitem['role'] == 'tool') -%}
        {{- '<end_of_turn>\n' -}}
        {%- set ns.turn = ns.turn + 1 -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


def checkpoint_chat_template(model_dir: str | Path) -> str | None:
    """A checkpoint's own template: chat_template.jinja (transformers prefers it), else
    tokenizer_config.json's (the default one of named templates), else a processor's chat_template.json."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    for path in (model_dir / "tokenizer_config.json", model_dir / "chat_template.json"):
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise G3nError(f"{path}: not valid JSON ({e})") from None
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template:
            return template
    return None


def export_chat_template(model_dir: str | Path) -> str:
    """The template an export carries: the checkpoint's own when it takes content parts and tools
    (a template without parts prints the list as a Python repr; Google's drops `tools` silently),
    else g3n's, which renders Google's turns the same and adds g3n's tool-call format."""
    own = checkpoint_chat_template(model_dir)
    return own if own is not None and takes_parts_and_tools(own) else CHAT_TEMPLATE


PROBE_TOOL = {"type": "function", "function": {"name": "g3n_probe_tool", "parameters": {"type": "object"}}}


def takes_parts_and_tools(template: str) -> bool:
    """Whether `template` renders a user turn of text parts as it renders the same text as a string,
    and writes the `tools` it is given into the prompt (rendered as transformers and llama-cpp-python
    do: sandboxed Jinja, blocks trimmed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(message):
        raise ValueError(message)

    def render(content, tools=None) -> str:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": content}], bos_token="<bos>", eos_token="<eos>",
            add_generation_prompt=True, raise_exception=fail, tools=tools,
        )  # fmt: skip

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    text = "Is this one text part?"
    try:
        plain = render(text)
        parts = text in plain and render([{"type": "text", "text": text}]) == plain
        return parts and "g3n_probe_tool" in render(text, [PROBE_TOOL])
    except Exception:  # noqa: BLE001 - a template that fails to parse or render takes neither
        return False


def check_text(text: str, what: str = "text") -> str:
    """`text` as SentencePiece can take it: a lone surrogate (a JSON \\ud800 escape, or bytes that
    were not UTF-8 read with surrogateescape) is an error naming its position, not a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise G3nError(f"{what} has an invalid character at position {e.start} ({text[e.start]!r}: not valid "
                       "UTF-8, e.g. a lone surrogate); fix or remove it") from None  # fmt: skip
    return text


def with_single_bos(ids: list[int], bos_id: int) -> list[int]:
    """Exactly one BOS at the start, however many the input had."""
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id] + list(ids[start:])


def _content(msg: dict, n: int, media: bool = False) -> str:
    content = msg.get("content")
    if isinstance(content, list):  # parts: text trimmed each (as Google's template), media as placeholders
        out = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"].strip())
            elif kind in MEDIA_PARTS and media:
                out.append(MEDIA_PARTS[kind])
            elif kind in MEDIA_PARTS:
                raise G3nError(
                    f"message {n}, part {i}: {kind} input needs the model loaded with its {kind} tower "
                    "(a Gemma3nForConditionalGeneration checkpoint; g3n chat --image/--audio)"
                )
            else:
                raise G3nError(f"message {n}, part {i}: unknown content part (use text, image or audio)")
        content = "".join(out)
    if not isinstance(content, str):
        raise G3nError(f"message {n}: 'content' must be a string")
    return content


def _added_tokens(model_dir: Path, sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """Special tokens from tokenizer_config.json's added_tokens_decoder (ids past SentencePiece's)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        decoder = json.loads(path.read_text()).get("added_tokens_decoder", {})
    except json.JSONDecodeError as e:
        raise G3nError(f"{path}: not valid JSON ({e})") from None
    out = {}
    for key, tok in decoder.items():
        i, content = int(key), tok.get("content")
        if content and tok.get("special", False) and (i >= sp.get_piece_size() or sp.is_control(i)):
            out[content] = i
    return out
