"""Tokenizer and chat template on the shipped tiny tokenizer (Gemma's special ids layout)."""

import pytest

from g3n.checkpoint.names import TINY_DIR
from g3n.errors import G3nError
from g3n.tokenizer import Tokenizer, with_single_bos

MESSAGES = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": " 2. "},
    {"role": "user", "content": "And  2+2?\n ok  "},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TINY_DIR)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_DIR)


def test_gemma_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert tok.stop_ids == {1, 106}


def test_chat_format(tok):
    assert tok.format_chat(MESSAGES) == (
        "<start_of_turn>user\nBe brief. \n\nWhat is 1+1?<end_of_turn>\n"
        "<start_of_turn>model\n2.<end_of_turn>\n"
        "<start_of_turn>user\nAnd  2+2?\n ok<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert not tok.format_chat(MESSAGES[1:2], add_generation_prompt=False).endswith("model\n")


def test_chat_matches_transformers_template(tok, hf_tok):
    ref = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "<bos>" + tok.format_chat(MESSAGES) == ref
    ids = tok.encode_chat(MESSAGES)
    assert ids == hf_tok(ref, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize(
    "text", ["Hello world!", "  two  spaces\n\nnew", "émoji 🙂 ok", "12345+678", "x<end_of_turn>y"]
)
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text)["input_ids"]


@pytest.mark.parametrize("text", ["<bos>Hi there", "<bos><bos>Hi", "Hi"])
def test_exactly_one_bos(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode(text) == tok.encode("Hi there" if "there" in text else "Hi")


def test_chat_with_bos_in_content_still_one_bos(tok):
    ids = tok.encode_chat([{"role": "user", "content": "<bos>hello"}])
    assert ids[0] == tok.bos_id and ids[1] == tok.start_of_turn_id


def test_with_single_bos():
    assert with_single_bos([2, 2, 2, 5], 2) == [2, 5]
    assert with_single_bos([5, 2], 2) == [2, 5, 2]
    assert with_single_bos([], 2) == [2]


def test_decode_roundtrip_and_specials(tok):
    text = "The capital of France is Paris. 🙂"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.end_of_turn_id]) == text
    assert tok.decode([tok.start_of_turn_id], skip_special=False) == "<start_of_turn>"


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"role": "assistant", "content": "hi"}], "expected a user turn"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected a model turn"),
        ([{"role": "robot", "content": "a"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 5}], "'content' must be a string"),
        # indices count the messages as given, a leading system message included
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 2: expected a model turn",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            r"message 1: unknown role 'system' \(use user, assistant or tool\)",
        ),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(G3nError, match=match):
        tok.format_chat(messages)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(G3nError, match="tokenizer.model not found"):
        Tokenizer.from_dir(tmp_path)


def test_added_tokens_past_sentencepiece(tmp_path):
    """Tokens listed in tokenizer_config.json beyond SentencePiece's ids (Gemma 3n's image/audio
    tokens) are matched in text and decoded by name (TOKENIZER768: 800 and 900 are past its pieces)."""
    import json
    import shutil

    from helpers import TOKENIZER768

    shutil.copy(TOKENIZER768 / "tokenizer.model", tmp_path)
    config = json.loads((TOKENIZER768 / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["800"] = {"content": "<image_soft_token>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("a<image_soft_token>b", add_bos=False)
    assert 800 in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special=False) == "a<image_soft_token>b"
    assert tok.decode([900], skip_special=False) == "<id 900>"
