"""The chat template every export carries renders what clients send exactly as g3n's format_chat:
transformers' apply_chat_template on the HF export, llama-cpp-python's Jinja formatter on the GGUF
(the template read from the file's metadata, as llama_cpp.Llama does), text and token ids alike,
tool definitions, calls and results (tool_calls.py's format) included."""

import json

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from g3n.checkpoint.names import TINY_DIR
from g3n.errors import G3nError
from g3n.tokenizer import CHAT_TEMPLATE, Tokenizer, export_chat_template, format_chat, takes_parts_and_tools

SYSTEM = {"role": "system", "content": "  Answer briefly. "}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": " Paris. \n"}
PARTS = [{"type": "text", "text": " What about "}, {"type": "text", "text": "Italy?\n"}]

TABLE = {  # name: (messages, add_generation_prompt)
    "string": ([Q1], True),
    "string, no generation prompt": ([Q1], False),
    "one text part": (
        [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        True,
    ),
    "text parts trimmed each": ([{"role": "user", "content": PARTS}], True),
    "empty parts": ([{"role": "user", "content": []}], True),
    "system string": ([SYSTEM, Q1], True),
    "system parts": ([{"role": "system", "content": [{"type": "text", "text": " Be brief. "}]}, Q1], True),
    "system only": ([SYSTEM], True),
    "multi-turn strings": ([SYSTEM, Q1, A1, {"role": "user", "content": "And Italy?"}], True),
    "multi-turn parts": (
        [
            Q1,
            {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
            {"role": "user", "content": PARTS},
        ],
        True,
    ),
    "ends with the assistant": ([SYSTEM, Q1, A1], False),
    "assistant named model": ([Q1, {"role": "model", "content": "Paris."}, Q1], True),
    "unicode and newlines": ([{"role": "user", "content": "  Ça va ?\n\n🙂 deux\tlignes\n "}], True),
}
MEDIA = {
    "image then text": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
    "audio then text": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": " Transcribe. "}]}],
    "image, audio, system, turns": [
        SYSTEM,
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "url": "x.png"}]},
        A1,
        {
            "role": "user",
            "content": [{"type": "audio", "path": "a.wav"}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
    ],
}
BAD = {  # format_chat's refusals, refused by the template too
    "turns out of order": [Q1, Q1],
    "assistant first": [A1],
    "unknown role": [{"role": "narrator", "content": "x"}],
    "second system message": [Q1, A1, {"role": "system", "content": "x"}],
    "unknown part": [{"role": "user", "content": [{"type": "video"}]}],
    "part without text": [{"role": "user", "content": [{"type": "text"}]}],
    "content missing": [{"role": "user"}],
    "content not text": [{"role": "user", "content": 5}],
    "content a mapping": [{"role": "user", "content": {"type": "text", "text": "x"}}],
    "tool result where the model speaks": [Q1, {"role": "tool", "content": "42"}],
    "assistant without content": [Q1, {"role": "assistant"}],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'The "current" weather\nin a city',
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "default": None}, "days": {"type": "integer", "minimum": 1.5},
                           "metric": {"enum": [True, False]}, "note": {"description": "Ça\tva"}},
            "required": ["city"],
        },
    },
}  # fmt: skip
NOW = {"type": "function", "function": {"name": "now"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_TABLE = {  # name: (messages, tools)
    "tools": ([Q1], [WEATHER, NOW]),
    "tools and a system prompt": ([SYSTEM, Q1], [WEATHER]),
    "tools and system parts": ([{"role": "system", "content": [{"type": "text", "text": " Be brief. "}]}, Q1], [NOW]),
    "a call and its result": (
        [Q1, {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": " 21 C "}],
        [WEATHER],
    ),
    "parallel calls, arguments as objects, text parts": (
        [
            Q1,
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    CALL,
                    {"id": "2", "type": "function", "function": {"name": "now", "arguments": {"tz": "UTC", "n": 1}}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "assistant", "content": "21 C at noon."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER, NOW],
    ),
    "a past call without tools offered now": (
        [Q1, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}],
        None,
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported as an HF checkpoint and as a GGUF, each exactly as users run them."""
    from transformers import AutoTokenizer

    from g3n.export.gguf import export_gguf
    from g3n.export.hf import export_hf

    d = tmp_path_factory.mktemp("template")
    hf = export_hf("tiny", d / "hf", dtype="float32")
    gguf = export_gguf("tiny", d / "tiny.gguf", quant="q8_0")
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return {"hf": AutoTokenizer.from_pretrained(hf), "llm": llm, "hf_dir": hf, "gguf": gguf}


def _llama_cpp(llm, messages, add_generation_prompt, **kw):
    """llama-cpp-python's chat formatting of a GGUF: its Jinja2ChatFormatter over the file's
    template with the model's own BOS/EOS text (what Llama.__init__ builds), and the prompt's ids
    as its chat completion tokenizes them (no BOS added when the template wrote one)."""
    bos, eos = (llm._model.token_get_text(i) for i in (llm.token_bos(), llm.token_eos()))
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, bos, add_generation_prompt)
    result = formatter(messages=messages, **kw)
    return result.prompt, llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def _transformers(tok, messages, add_generation_prompt, **kw):
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kw)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)["input_ids"]
    return text, ids


def test_every_export_carries_g3ns_template(exported):
    assert json.loads((TINY_DIR / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert exported["llm"].metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert json.loads((exported["hf_dir"] / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (exported["hf_dir"] / "chat_template.jinja").read_text() == CHAT_TEMPLATE


@pytest.mark.parametrize("name", TABLE)
def test_renders_identically(exported, name):
    messages, gen = TABLE[name]
    tok = Tokenizer.from_dir(TINY_DIR)
    ours = "<bos>" + format_chat(messages, gen)
    ids = tok.encode_chat(messages, gen)
    hf_text, hf_ids = _transformers(exported["hf"], messages, gen)
    cpp_text, cpp_ids = _llama_cpp(exported["llm"], messages, gen)
    assert hf_text == ours and cpp_text == ours
    assert hf_ids == ids and cpp_ids == ids
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # exactly one BOS everywhere


@pytest.mark.parametrize("name", MEDIA)
def test_media_parts_render_as_gemmas_placeholders(exported, name):
    """Image and audio parts become <image_soft_token> / <audio_soft_token>, where format_chat puts
    them for the processors (media.py, transformers' Gemma3nProcessor) to expand."""
    messages = MEDIA[name]
    ours = "<bos>" + format_chat(messages, media=True)
    assert "<image_soft_token>" in ours or "<audio_soft_token>" in ours
    assert _transformers(exported["hf"], messages, True)[0] == ours
    assert _llama_cpp(exported["llm"], messages, True)[0] == ours


@pytest.mark.parametrize("name", BAD)
def test_refused_everywhere(exported, name):
    messages = BAD[name]
    with pytest.raises(G3nError):
        format_chat(messages, media=True)
    with pytest.raises(Exception, match="message|content|role|tool"):
        _transformers(exported["hf"], messages, True)
    with pytest.raises(Exception, match="message|content|role|tool"):
        _llama_cpp(exported["llm"], messages, True)


@pytest.mark.parametrize("name", TOOL_TABLE)
def test_tool_calls_render_identically(exported, name):
    """Tools, calls and results as tool_calls.py writes them, in transformers and llama-cpp-python
    alike (their `tojson` filters differ: the template writes JSON with its own macro)."""
    messages, tools = TOOL_TABLE[name]
    tok = Tokenizer.from_dir(TINY_DIR)
    ours = "<bos>" + format_chat(messages, tools=tools)
    if tools:
        assert '{"name": "' + tools[0]["function"]["name"] + '"' in ours
    hf_text, hf_ids = _transformers(exported["hf"], messages, True, tools=tools)
    cpp_text, cpp_ids = _llama_cpp(exported["llm"], messages, True, tools=tools)
    assert hf_text == ours and cpp_text == ours
    assert hf_ids == tok.encode(ours) and cpp_ids == hf_ids


# Google's template for Gemma 3n (its tokenizer_config.json): it takes parts, so exports keep it.
GOOGLE_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n{%- if messages[0]['content'] is string -%}\n"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n{%- else -%}\n"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n{%- endif -%}\n"
    '{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n{%- set first_user_prefix = "" -%}\n'
    "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n{%- endif -%}\n'
    "{%- if (message['role'] == 'assistant') -%}\n{%- set role = \"model\" -%}\n{%- else -%}\n"
    "{%- set role = message['role'] -%}\n{%- endif -%}\n"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "{%- if message['content'] is string -%}\n{{ message['content'] | trim }}\n"
    "{%- elif message['content'] is iterable -%}\n{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'audio' -%}\n{{ '<audio_soft_token>' }}\n{%- elif item['type'] == 'image' -%}\n"
    "{{ '<image_soft_token>' }}\n{%- elif item['type'] == 'text' -%}\n{{ item['text'] | trim }}\n{%- endif -%}\n"
    '{%- endfor -%}\n{%- else -%}\n{{ raise_exception("Invalid content type") }}\n{%- endif -%}\n'
    "{{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n{{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
# What g3n's exports carried before: list content printed as a Python repr.
OLD_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] -%}{{ '<start_of_turn>' + role + '\n' }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _checkpoint_with(tmp_path, name, template, where="tokenizer_config.json"):
    import shutil

    d = tmp_path / name
    shutil.copytree(TINY_DIR, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    if where == "tokenizer_config.json" and template is not None:
        config["chat_template"] = template
    elif template is not None:
        (d / where).write_text(template)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_a_checkpoints_own_template_is_kept_when_it_takes_parts_and_tools(tmp_path):
    """A template that takes parts and tools (in tokenizer_config.json or chat_template.jinja) is
    kept; Google's, which drops tools, one without parts, a broken one, or none at all get g3n's.
    Google's renders our table as format_chat does (below), so nothing else changes for it."""
    own = GOOGLE_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}", 1)
    assert takes_parts_and_tools(own) and takes_parts_and_tools(CHAT_TEMPLATE)
    for bad in (GOOGLE_TEMPLATE, OLD_TEMPLATE, "{{ broken", ""):
        assert not takes_parts_and_tools(bad)
    for where in ("tokenizer_config.json", "chat_template.jinja"):
        assert export_chat_template(_checkpoint_with(tmp_path, f"own-{where}", own, where)) == own
    assert export_chat_template(_checkpoint_with(tmp_path, "google", GOOGLE_TEMPLATE)) == CHAT_TEMPLATE
    assert export_chat_template(_checkpoint_with(tmp_path, "old", OLD_TEMPLATE)) == CHAT_TEMPLATE
    assert export_chat_template(_checkpoint_with(tmp_path, "none", None)) == CHAT_TEMPLATE

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    google = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(GOOGLE_TEMPLATE)
    for name, (messages, gen) in TABLE.items():
        # Google's template needs a user turn, and takes a system prompt's first part untrimmed (g3n
        # trims each part and joins them, as it does for user turns)
        if name not in ("system only", "system parts"):
            assert google.render(
                messages=messages, bos_token="<bos>", add_generation_prompt=gen
            ) == "<bos>" + format_chat(messages, gen), name


def test_exports_replace_a_template_without_parts(tmp_path):
    """An HF export and a GGUF of a checkpoint whose template prints lists as a repr carry g3n's."""
    from g3n.export.gguf import export_gguf
    from g3n.export.hf import export_hf

    old = _checkpoint_with(tmp_path, "old", OLD_TEMPLATE, "chat_template.jinja")
    hf = export_hf(old, tmp_path / "hf", dtype="float32")
    assert (hf / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert "chat_template" not in json.loads((hf / "tokenizer_config.json").read_text())
    llm = llama_cpp.Llama(model_path=str(export_gguf(old, tmp_path / "old.gguf", quant="q8_0")), vocab_only=True,
                          verbose=False)  # fmt: skip
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_llama_cpp_chat_completion_takes_parts(exported):
    """llama-cpp-python's own chat completion on the GGUF (the file's template, chosen by Llama
    itself): a question sent as content parts gets the prompt and the answer a string gets."""
    tok = Tokenizer.from_dir(TINY_DIR)
    llm = llama_cpp.Llama(model_path=str(exported["gguf"]), n_ctx=256, n_threads=1, verbose=False)
    assert llm.chat_format == "chat_template.default"
    replies = []
    for content in (Q1["content"], [{"type": "text", "text": Q1["content"]}]):
        out = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=12, temperature=0.0)
        assert out["usage"]["prompt_tokens"] == len(tok.encode_chat([Q1]))
        replies.append(out["choices"][0]["message"]["content"])
    assert replies[0] == replies[1] and "Paris" in replies[0]
