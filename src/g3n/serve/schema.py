"""OpenAI's chat-completions request, checked field by field.

Parsing is by hand rather than through a validation library so that every problem becomes
OpenAI's error body (errors.py) naming the field, which is what OpenAI clients show their users.
Unknown fields are ignored (clients send `user`, `metadata` and the like); fields we cannot honour
(n > 1, tools, logprobs, penalties) are refused rather than silently dropped.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from g3n.inference.sampling import SamplingParams
from g3n.serve.content import parse_messages
from g3n.serve.errors import APIError, bad


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


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


# Fields we cannot honour, with the value that means "not asked for".
_REFUSED = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": None,
    "functions": None,
}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat_request(body: dict, model_name: str, max_tokens_default: int) -> ChatRequest:
    """Check a /v1/chat/completions body; sampling defaults are Google's for Gemma 3n."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the id from GET /v1/models", "model")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server runs '{model_name}'",
                       param="model", code="model_not_found")  # fmt: skip
    for name, neutral in _REFUSED.items():
        value = body.get(name)
        if value is not None and value != neutral and value != []:
            raise bad(f"'{name}' is not supported by this server (only {json.dumps(neutral)})", name, "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("'response_format' must be {\"type\": \"text\"} (structured output is not supported)",
                  "response_format", "unsupported")  # fmt: skip

    messages, modalities = parse_messages(body.get("messages"))

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
        max_new_tokens=max_tokens,
        # every request gets a seed, so its draws never depend on what it is batched with
        seed=secrets.randbits(31) if seed is None else seed,
    )
    return ChatRequest(messages, modalities, params, _stop(body.get("stop")), bool(stream),
                       bool(options.get("include_usage")), _logit_bias(body.get("logit_bias")),
                       _logprobs(body))  # fmt: skip


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


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops
