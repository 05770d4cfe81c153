"""Grammar-constrained decoding: JSON (any object, or a JSON schema) through llguidance.

`json_grammar(schema)` compiles and checks a schema once, when the request arrives (a bad schema
is the client's error); `GrammarProcessor` is the engine's per-row `Request.processor`: it keeps
the row's matcher, advances it with the tokens drawn since its last call and masks every token the
grammar does not allow next. Once the value is complete only the end tokens (`<end_of_turn>`,
`<eos>`) remain, so the row stops there.

llguidance works on the tokens' bytes, so the vocabulary is SentencePiece's pieces as bytes:
byte-fallback pieces (`<0x7B>`) are their one byte, `▁` a space, and tokens whose text the reply
never shows (control tokens, turn markers, `<...>` user-defined pieces) are special, never allowed
inside the JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import torch

from g3n.errors import G3nError

# One line of JSON, spaced as Python's json.dumps: no whitespace runs for a model to loop in.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise G3nError("structured output (response_format) needs llguidance: pip install 'g3n[serve]'") from None
    return llguidance


def json_grammar(schema: dict | None) -> str:
    """llguidance's grammar for JSON values matching `schema` (None: any JSON object); raises
    G3nError naming what llguidance cannot take (an unsupported keyword, a bad $ref, ...)."""
    llg = _llguidance()
    schema = ANY_OBJECT if schema is None else schema
    if not isinstance(schema, dict):
        raise G3nError("the JSON schema must be an object")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise G3nError(f"the JSON schema cannot be used: {e}") from None
    return _checked(grammar, "the JSON schema")


NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
PROSE = r"/[^\[{\s][\s\S]*/"  # a reply that is not a call: anything not opening with { or [


def tool_grammar(funcs: list, choice: str, parallel: bool, prose_schema: dict | None = None) -> str:
    """llguidance's grammar for a reply under a tool choice (tool_calls.py's format): "auto" (text,
    or calls), "required" (calls) or "none" (text that is not a call); `funcs`
    (tool_calls.Function) are the functions it may call. `parallel`: a JSON list of at least two
    calls is allowed too. `prose_schema`: the text must be JSON of this schema (response_format)."""

    def embedded(schema: dict) -> str:  # laid out as json.dumps writes JSON, as response_format's
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})

    one = [{"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters or NO_PARAMETERS},
            "required": ["name", "parameters"], "additionalProperties": False} for f in funcs]  # fmt: skip
    call = one[0] if len(one) == 1 else {"anyOf": one}
    rules = {}
    if choice in ("auto", "none"):
        rules["prose"] = embedded(prose_schema) if prose_schema is not None else PROSE
    if choice in ("auto", "required") and one:
        rules["call"] = embedded(call)
        if parallel:
            rules["calls"] = embedded({"type": "array", "items": call, "minItems": 2})
    lark = "start: " + " | ".join(rules) + "\n" + "".join(f"{name}: {rule}\n" for name, rule in rules.items())
    return _checked(_llguidance().grammar_from("lark", lark), "the tools' parameter schemas")


def _checked(grammar: str, what: str) -> str:
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise G3nError(f"{what} cannot be used: {messages[0]}")
    return grammar


_SPECIAL_SHAPE = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class Vocabulary:
    """llguidance's tokenizer over the model's ids, and the token of each single byte."""

    tokenizer: object  # llguidance.LLTokenizer
    byte_ids: dict[int, int]

    @property
    def size(self) -> int:
        return self.tokenizer.vocab_size


def vocabulary(tok, vocab_size: int) -> Vocabulary:
    """llguidance's view of `tok` (g3n's Tokenizer) over the model's `vocab_size` ids (a pass over
    the pieces: build it once per model and keep it)."""
    from sentencepiece import sentencepiece_model_pb2

    llg = _llguidance()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    kinds = proto.SentencePiece.Type
    tokens: list[bytes] = []
    for i in range(vocab_size):
        if i >= len(proto.pieces):
            tokens.append(b"\xff" + tok.id_to_special.get(i, f"<id {i}>").encode())
            continue
        piece = proto.pieces[i]
        if piece.type == kinds.BYTE:
            tokens.append(bytes([int(piece.piece[3:5], 16)]))
        elif (
            tok.is_special(i)
            or piece.type in (kinds.UNKNOWN, kinds.UNUSED)
            or (piece.type == kinds.USER_DEFINED and _SPECIAL_SHAPE.fullmatch(piece.piece))
        ):
            tokens.append(b"\xff" + piece.piece.encode())
        else:
            tokens.append(piece.piece.replace("\u2581", " ").encode())
    wrapper = _Pieces(tokens, tok)
    lltok = llg.LLTokenizer(llg.TokenizerWrapper(wrapper), n_vocab=vocab_size, eos_token=sorted(tok.stop_ids))
    return Vocabulary(lltok, wrapper.byte_ids)


class _Pieces:
    """What llguidance's TokenizerWrapper asks of a tokenizer: the pieces' bytes and encoding."""

    def __init__(self, tokens: list[bytes], tok):
        self.tokens, self.tok = tokens, tok
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self.byte_ids: dict[int, int] = {}
        for i, t in enumerate(tokens):
            if len(t) == 1:
                self.byte_ids.setdefault(t[0], i)

    def __call__(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="ignore")
        valid = len(text.encode())
        ids = self.tok.sp.encode(text) if text else []
        if valid < len(data):  # an incomplete character at the end: its bytes as byte pieces
            ids += [self.byte_ids[b] for b in data[valid:] if b in self.byte_ids]
        return ids


# Bytes tried first when closing a value early: a string's end, the object's or array's end, the
# next member, the shortest number, then anything the grammar allows.
_CLOSING = b'"}],0:tfn{[-1 '
CLOSING_ROOM = 16  # tokens of slack beyond the shortest closing, for a token that opens a new part
MAX_CLOSING = 4096  # a longer closing (a pattern the greedy choice cannot satisfy): none


_executor = None  # llguidance's thread pool, made at the first batch of masks
_SHIFTS = torch.arange(32, dtype=torch.int32)


def mask_rows(processors: list[GrammarProcessor], generated: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """`logits` (rows, vocab) with what each row's grammar forbids next at -inf. The rows' masks are
    computed at once, in llguidance's threads, and go to the device in one copy: a batch of
    grammar rows costs about one row's host time, not one per row."""
    global _executor
    rows, words = len(processors), processors[0].words
    bits = np.zeros((rows, words), dtype=np.uint32)
    jobs = []
    for i, (proc, tokens) in enumerate(zip(processors, generated, strict=True)):
        only = proc._advance(tokens)
        if only is None:
            jobs.append((proc.matcher, i))
        else:
            for t in only:
                bits[i, t // 32] |= np.uint32(1 << (t % 32))
    if jobs:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
        _executor.unsafe_compute_mask_ptr(jobs, bits.ctypes.data, words * 4, rows)
    packed = torch.from_numpy(bits.view(np.int32)).to(logits.device)
    allowed = ((packed[:, :, None] >> _SHIFTS.to(logits.device)) & 1).reshape(rows, -1).bool()
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:  # the model's rows past the tokenizer's ids
        allowed = torch.cat([allowed, allowed.new_zeros(rows, vocab - allowed.shape[1])], dim=1)
    return logits.masked_fill(~allowed[:, :vocab], float("-inf"))


class GrammarProcessor:
    """A row's grammar: `processor(generated tokens, logits (vocab,))` -> logits with every token
    the grammar forbids next at -inf. It consumes the tokens generated since its last call.

    `budget`: the row's new tokens (max_tokens). Before it runs out, the value is closed early
    (strings cut, optional parts left out) along a short way the grammar allows, so that even a
    reply cut by max_tokens parses and validates; `closed_early` then says so (its finish is
    "length")."""

    def __init__(self, vocab, grammar: str, end_ids, budget: int | None = None):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise G3nError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.vocab, self.budget = vocab, budget
        self.end_ids = sorted(end_ids)
        self.words = (vocab.size + 31) // 32
        self.consumed = 0
        self.closing: list[int] | None = None  # the forced tokens that close the value, once started
        self._closing_from = 0  # tokens generated when the closing started
        self.closed_early = False
        self._next_check = 0  # how many tokens generated when the closing's length is next measured

    batched = staticmethod(mask_rows)  # the engine's hook for a step's grammar rows at once

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return mask_rows([self], [generated], logits[None])[0]

    def _advance(self, generated: list[int]) -> list[int] | None:
        """Consume the tokens generated since the last call; the only tokens allowed next when
        that is decided without a mask (the closing's next token, the end), else None."""
        for t in generated[self.consumed :]:
            if t not in self.end_ids:
                self.matcher.consume_token(t)
        self.consumed = len(generated)
        if self.matcher.is_error():
            return self.end_ids
        if self.budget is not None and self.closing is None:
            self._plan(len(generated))
        if self.closing is not None:
            at = len(generated) - self._closing_from
            return self.closing[at : at + 1] or self.end_ids
        return None

    def _plan(self, produced: int) -> None:
        """Start closing when the tokens left barely hold the shortest closing and the end token.
        Measured every step near the end, every 32 tokens before."""
        if produced < self._next_check:
            return
        left = self.budget - produced
        if self.matcher.is_accepting():
            self._next_check = produced + 1
            return
        path = self._closing_path()
        if path is None:
            self._next_check = produced + 32
            return
        if left <= 2 * len(path) + 1 + CLOSING_ROOM:
            self.closing, self._closing_from, self.closed_early = path, produced, True
        elif left <= 4 * len(path) + 64:
            self._next_check = produced + 1
        else:
            self._next_check = produced + min(32, (left - 4 * len(path) - 64) // 2 + 1)

    def _closing_path(self) -> list[int] | None:
        """Tokens that complete the value from here: what the grammar forces, else the first byte
        in _CLOSING's order it allows (None: no end within MAX_CLOSING tokens)."""
        m = self.matcher.deep_copy()
        byte_ids = self.vocab.byte_ids
        order = [byte_ids[b] for b in _CLOSING if b in byte_ids]
        order += [i for b, i in sorted(byte_ids.items()) if b not in _CLOSING]
        path: list[int] = []
        while not m.is_accepting():
            forced = m.compute_ff_tokens()  # what the grammar allows only one way (a key's name)
            steps = forced or [next((t for t in order if m.validate_tokens([t]) == 1), None)]
            if steps[0] is None or len(path) >= MAX_CLOSING:
                return None
            m.consume_tokens(steps)
            path += steps
        return path
