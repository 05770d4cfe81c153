"""POST /v1/completions on the tiny model over real HTTP: raw prompts (strings, token ids, batches),
echo and the legacy logprobs shape, lm-eval's loglikelihood request checked against the model's
own forward, streaming, stop and seed, and the clients that speak it (openai, LiteLLM, lm-eval)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from g3n.inference.generate import stream_text
from g3n.inference.sampling import SamplingParams
from g3n.serve import Limits
from helpers import request, stream_chunks

PROMPT = "The capital of France is"
MAX_BATCH = 8
APP_OPTIONS = {"limits": Limits(max_body_bytes=2**20)}


def complete(server, prompt=PROMPT, **kw):
    status, out = request(server, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, **kw}, timeout=120)
    assert status == 200, out
    return out


def stream(server, prompt=PROMPT, **kw):
    """The parsed chunks of a streamed completion (up to [DONE])."""
    return stream_chunks(server, "/v1/completions", {"model": "tiny", "prompt": prompt, **kw})


def lone_text(engine, ids, **params):
    return "".join(stream_text(engine.model, engine.tok, ids, SamplingParams(**params)))


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, from the model's plain forward (the reference)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [logits[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_text_prompt_is_g3ns_raw_continuation(server, engine):
    out = complete(server, temperature=0, max_tokens=12)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny"
    (choice,) = out["choices"]
    ids = engine.encode(PROMPT)
    assert choice["text"] == lone_text(engine, ids, greedy=True, max_new_tokens=12)
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["total_tokens"] == len(ids) + usage["completion_tokens"]


def test_token_prompts_and_batches(server, engine):
    """Token ids are the same prompt as its text; a batch answers each prompt at its index, each
    the text it gets alone (the seed is per prompt, so batching changes nothing)."""
    ids = engine.encode(PROMPT)
    kw = {"temperature": 1.0, "seed": 5, "max_tokens": 10}
    alone = complete(server, PROMPT, **kw)["choices"][0]["text"]
    assert complete(server, ids, **kw)["choices"][0]["text"] == alone
    assert complete(server, ids[1:], **kw)["choices"][0]["text"] == alone  # a BOS is put first when missing
    other = "Once upon a time"
    out = complete(server, [PROMPT, other, engine.encode(other)], **kw)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert texts[0] == alone and texts[1] == texts[2] == complete(server, other, **kw)["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == 2 * len(engine.encode(other)) + len(ids)


def test_echo_logprobs_are_the_models_own(server, engine, tiny):
    """echo + logprobs + max_tokens 0 (lm-eval's loglikelihood request): every prompt token with
    its log-probability from one forward, the first null, offsets into the echoed text."""
    model, tok = tiny
    ids = engine.encode(PROMPT)
    out = complete(server, PROMPT, echo=True, logprobs=2, max_tokens=0)
    (choice,) = out["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == tok.decode(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert 2 <= len(top) <= 3 and top[token] == value  # the two likeliest, and the token itself
        assert max(top.values()) >= value
    # a token list without BOS: the ids sent are echoed, each given everything before it (BOS first)
    lp = complete(server, ids[1:], echo=True, logprobs=0, max_tokens=0)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    assert all(len(top) == 1 for top in lp["top_logprobs"])


def test_echo_and_generation_logprobs_together(server, engine, tiny):
    """max_tokens 1 with echo (what lm-eval 0.4 sends): the prompt's tokens, then the new one."""
    model, _ = tiny
    ids = engine.encode(PROMPT)
    lp = complete(server, PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0)["choices"][0]
    new = lone_text(engine, ids, greedy=True, max_new_tokens=1)
    assert lp["text"] == PROMPT + new and len(lp["logprobs"]["tokens"]) == len(ids) + 1
    assert lp["logprobs"]["token_logprobs"][1:-1] == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    # greedy: the new token is the likeliest one
    last = lp["logprobs"]
    assert last["token_logprobs"][-1] == pytest.approx(max(last["top_logprobs"][-1].values()))
    assert last["text_offset"][-1] == len(engine.tok.decode(ids))
    plain = complete(server, PROMPT, echo=True, max_tokens=3, temperature=0)["choices"][0]
    assert plain["text"] == PROMPT + lone_text(engine, ids, greedy=True, max_new_tokens=3) and not plain["logprobs"]


def test_streamed_completion(server, engine):
    kw = {"temperature": 1.0, "seed": 3, "max_tokens": 12}
    whole = complete(server, **kw)["choices"][0]
    chunks = stream(server, **kw, stream_options={"include_usage": True})
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == whole["text"]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == [
        whole["finish_reason"]
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    # echo with logprobs, two prompts: each choice's chunks add up to its non-streamed answer
    body = {"echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    whole = complete(server, [PROMPT, "Hello"], **body)["choices"]
    chunks = stream(server, [PROMPT, "Hello"], **body)
    for choice in whole:
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == choice["index"]]
        assert "".join(ch["text"] for ch in mine) == choice["text"]
        tokens = [t for ch in mine if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
        offsets = [t for ch in mine if ch["logprobs"] for t in ch["logprobs"]["text_offset"]]
        assert tokens == choice["logprobs"]["tokens"] and offsets == choice["logprobs"]["text_offset"]


def test_stop_seed_and_errors(server):
    out = complete(server, "The capital of France is Paris. The capital of France is", temperature=0, max_tokens=20,
                   stop=[" is"])["choices"][0]  # fmt: skip
    assert " is" not in out["text"] and out["finish_reason"] == "stop"
    a = complete(server, seed=9, temperature=1.5, top_k=0, max_tokens=16)["choices"][0]["text"]
    assert a == complete(server, seed=9, temperature=1.5, top_k=0, max_tokens=16.0)["choices"][0]["text"]
    bad = [  # (body, field the error names, words in the message)
        ({}, "prompt", "'prompt' is required"),
        ({"prompt": []}, "prompt", "'prompt' is required"),
        ({"prompt": [PROMPT, 5]}, "prompt", "prompt[1] must be a string"),
        ({"prompt": [[1, 2], []]}, "prompt", "prompt[1] must be a string or a non-empty list"),
        ({"prompt": [2, 10**9]}, "prompt", "outside the vocabulary"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "between 0 and 20"),
        ({"prompt": "hi", "logprobs": True}, "logprobs", "an integer"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "between"),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens", "an integer"),
        ({"prompt": "hi", "echo": "yes"}, "echo", "true or false"),
        ({"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
        ({"prompt": "hi", "best_of": 2}, "best_of", "between 1 and 1"),
        ({"prompt": "hi", "n": 2}, "n", "not supported"),
        ({"prompt": "hi", "temperature": 9}, "temperature", "between"),
        ({"prompt": "word " * 3000}, "prompt", "at most 2047"),
        ({"prompt": ["hi"] * 33}, "prompt", "queues at most 32"),
    ]
    for body, param, words in bad:
        status, out = request(server, "POST", "/v1/completions", {"model": "tiny", **body}, timeout=120)
        assert status == 400 and out["error"]["param"] == param and words in out["error"]["message"], (body, out)
    status, out = request(server, "POST", "/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, timeout=120)
    assert status == 404 and out["error"]["code"] == "model_not_found"


def test_openai_and_litellm_clients(server, engine, monkeypatch):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ids = engine.encode(PROMPT)
    expected = lone_text(engine, ids, greedy=True, max_new_tokens=8)
    out = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=8)
    assert out.choices[0].text == expected and out.usage.prompt_tokens == len(ids)
    pieces = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == expected
    out = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) == len(ids)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # its price list from the package, not the network
    litellm = pytest.importorskip("litellm")
    out = litellm.text_completion(model="openai/tiny", prompt=PROMPT, api_base=server.url + "/v1", api_key="unused",
                                  temperature=0, max_tokens=8)  # fmt: skip
    assert out.choices[0].text == expected


TASK = """task: g3n_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_loglikelihood_task(server, engine, tiny, tmp_path):
    """lm-eval's `local-completions` runs a multiple-choice task from a local task file against the
    server: every choice's log-likelihood is the one the model's own forward gives."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from g3n.checkpoint.names import TINY_DIR

    docs = [
        {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "a small blue whale"],
         "answer": 0},
        {"question": "What is 2+3?", "choices": ["5", "seven"], "answer": 0},
    ]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    args = {"model": "tiny", "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(TINY_DIR), "max_retries": 1, "add_bos_token": True}  # fmt: skip
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["g3n_capitals"],
                                      task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)  # fmt: skip
    samples = results["samples"]["g3n_capitals"]
    assert len(samples) == len(docs)
    model, tok = tiny
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"])
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            assert continuation.strip() in sample["doc"]["choices"]
            whole, context = tok.encode(context + continuation), tok.encode(context)
            assert whole[: len(context)] == context  # the choice's tokens follow the context's
            expected = sum(direct_logprobs(model, whole)[len(context) - 1 :])
            assert math.isclose(resp[0][0], expected, abs_tol=1e-3), (context, continuation, resp, expected)
