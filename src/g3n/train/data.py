"""Chat datasets for fine-tuning: read files, normalise formats to Gemma 3n turns, tokenize with
response-only labels, truncate with a count, and pack samples into rows.

Formats (one record each): OpenAI-style {"messages": [{"role", "content"}]}, ShareGPT
{"conversations": [{"from": human|gpt|system, "value"}]}, Alpaca {"instruction", "input", "output"}
and plain {"text"}. Files: JSONL, JSON (a list of records), CSV and Parquet (one record per row), and
directories written by `datasets`' `save_to_disk` (read with pyarrow; the `datasets` package is not
needed).
Labels follow transformers' convention (aligned with the ids; the loss shifts them); -100 marks
tokens without loss.

Images and audio: a message's content may be a list of parts, {"type": "text", "text"}, {"type":
"image", "image": PATH} and {"type": "audio", "audio": PATH}, paths relative to the dataset file.
A user turn with media is tokenized whole, as the prompt is at inference; image/audio markers and
soft tokens never carry labels; the files are read when their batch is built.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from g3n.errors import G3nError
from g3n.tokenizer import (
    AUDIO_PLACEHOLDER,
    END_OF_TURN,
    IMAGE_PLACEHOLDER,
    MEDIA_PARTS,
    ROLES,
    START_OF_TURN,
    check_text,
    format_chat,
)

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs; `where` names the file and line or row for error messages."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    if not path.is_file():
        raise G3nError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, line in _lines(path):
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise G3nError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise G3nError(f"{path}: not UTF-8 (byte offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise G3nError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise G3nError(f"{path}: expected a JSON list of records")
        for n, record in enumerate(data):
            yield f"{path}[{n}]", record
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            n = 1
            try:
                for n, row in enumerate(csv.DictReader(f), start=2):
                    yield f"{path}:{n}", dict(row)
            except UnicodeDecodeError:
                raise G3nError(f"{path}: not UTF-8 (after line {n})") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise G3nError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for n, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {n}", row
    else:
        raise G3nError(
            f"{path}: unknown dataset format {suffix!r} (use .jsonl, .json, .csv, .parquet or a datasets directory)"
        )


def _lines(path: Path, stats: DataStats | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a JSONL file's non-blank lines; a line that is not UTF-8 is an error
    naming it (with `stats` given, skipped and listed)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"{path}:{n}: not UTF-8 (byte offset {e.start} in the line)"
                if stats is None:
                    raise G3nError(problem) from None
                stats.skipped.append(problem)
                continue
            if line.strip():
                yield n, line


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a `datasets` save_to_disk directory: a Dataset (state.json + Arrow stream files) or
    a DatasetDict (dataset_dict.json + one directory per split; its "train" split is read)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise G3nError(f"{path}: a DatasetDict without a 'train' split; name a split directory ({splits})")
        path = path / "train"
    state_file = path / "state.json"
    if not state_file.is_file():
        raise G3nError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json)")
    try:
        import pyarrow as pa
    except ImportError:
        raise G3nError(f"{path}: reading a datasets directory needs pyarrow (pip install pyarrow)") from None
    files = [f["filename"] for f in json.loads(state_file.read_text()).get("_data_files", [])]
    n = 0
    for name in files:
        try:
            with pa.memory_map(str(path / name)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise G3nError(f"{path / name}: cannot read the Arrow file ({e})") from None
        for row in table.to_pylist():
            yield f"{path} row {n}", row
            n += 1


def to_messages(record, where: str) -> list[dict] | str:
    """Gemma chat messages for a record, or plain text for {"text": ...} records."""
    if not isinstance(record, dict):
        raise G3nError(f"{where}: expected an object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise G3nError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise G3nError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        out = []
        for t in turns:
            role = SHAREGPT_ROLES.get(t.get("from"))
            if role is None:
                raise G3nError(f"{where}: unknown ShareGPT speaker {t.get('from')!r} (human, gpt or system)")
            out.append({"role": role, "content": t.get("value")})
        return out
    if "instruction" in record and "output" in record:
        prompt = _alpaca_text(record, "instruction", where)
        if record.get("input"):
            prompt += "\n\n" + _alpaca_text(record, "input", where)
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _alpaca_text(record, "output", where)},
        ]
    if isinstance(record.get("text"), str):
        return record["text"]
    raise G3nError(f"{where}: unknown record format (expected messages, conversations, instruction/output or text)")


def _alpaca_text(record: dict, name: str, where: str) -> str:
    """An Alpaca field as text (numbers included); null or a list/object would train on its repr."""
    value = record[name]
    if value is None:
        raise G3nError(f"{where}: field {name} is null")
    if isinstance(value, (dict, list)):
        raise G3nError(f"{where}: field {name} must be text, got {type(value).__name__}")
    return str(value)


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    media: tuple[tuple[str, str], ...] = ()  # (kind, file path) of each image/audio, in order


def media_files(sample, base_dir: Path | None, where: str) -> tuple[tuple[str, str], ...]:
    """(kind, path) of every image/audio part, paths resolved against the dataset's folder; a
    missing file is an error naming the record."""
    found = []
    for message in sample if isinstance(sample, list) else []:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in MEDIA_PARTS:
                continue
            ref = part.get(kind, part.get("path"))
            if not isinstance(ref, str):
                raise G3nError(f"{where}: an {kind} part needs '{kind}': a file path")
            path = Path(ref) if base_dir is None or Path(ref).is_absolute() else base_dir / ref
            if not path.is_file():
                raise G3nError(f"{where}: {kind} file {ref} not found (looked for {path})")
            found.append((kind, str(path)))
    return tuple(found)


def tokenize(
    tok, sample: list[dict] | str, responses_only: bool = True, where: str = "", media_tokens=None, base_dir=None
) -> Example:
    """Token ids (one BOS) and labels. With responses_only, only model turns (their text and
    <end_of_turn>) carry labels; otherwise every token but the BOS does. `media_tokens`
    (towers.MediaTokens) is needed for samples with images or audio."""
    check_sample(tok, sample, where)
    if isinstance(sample, str):
        ids = tok.encode(sample) + [tok.eos_id]
        return Example(ids, [IGNORE] + ids[1:])
    media = media_files(sample, base_dir, where)
    if media and media_tokens is None:
        raise G3nError(f"{where}: has images/audio, but the model is not a multimodal checkpoint")
    try:  # validates roles and order
        text = format_chat(sample, add_generation_prompt=False, media=bool(media))
    except G3nError as e:
        raise G3nError(f"{where}: {e}") from None
    ids, labels = [tok.bos_id], [IGNORE]
    newline = tok.encode("\n", add_bos=False)
    for turn in text.split(END_OF_TURN + "\n")[:-1]:
        head, body = turn.split("\n", 1)
        learn = head.removeprefix(START_OF_TURN) == ROLES["assistant"] or not responses_only
        if IMAGE_PLACEHOLDER in body or AUDIO_PLACEHOLDER in body:
            from g3n.media import expand_placeholders, media_ids

            whole = expand_placeholders(tok, turn, media_tokens) + [tok.end_of_turn_id]
            skip = media_ids(media_tokens)
            ids += whole
            labels += [t if learn and t not in skip else IGNORE for t in whole]
        else:
            prompt = tok.encode(head + "\n", add_bos=False)
            reply = tok.encode(body, add_bos=False) + [tok.end_of_turn_id]
            ids += prompt + reply
            labels += _labels(prompt, not responses_only) + _labels(reply, learn)
        ids += newline
        labels += _labels(newline, not responses_only)
    return Example(ids, labels, media)


def check_sample(tok, sample: list[dict] | str, where: str) -> None:
    """Refuse text SentencePiece cannot take, and, in chat messages, the text of special tokens: a
    user's `<end_of_turn>` would end the turn early and move the loss onto user text. (A text
    record writes its own format, so its markers stay tokens.)"""
    if isinstance(sample, str):
        check_text(sample, where)
        return
    for n, message in enumerate(sample):
        content = message.get("content")
        parts = [content] if isinstance(content, str) else []
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        for text in parts:
            check_text(text, f"{where}: message {n}")
            marker = tok.reserved_text(text)
            if marker:
                raise G3nError(f"{where}: message {n} contains {marker!r}, a special token's text; chat data may "
                               "not write turn markers or special tokens (remove it, or write the whole format "
                               'yourself as a {"text": ...} record)')  # fmt: skip


def _labels(tokens: list[int], learn: bool) -> list[int]:
    return list(tokens) if learn else [IGNORE] * len(tokens)


@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    without_labels: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # bad records passed over with skip_bad


def load_examples(
    paths, tok, max_length: int, responses_only: bool = True, skip_bad: bool = False, media_tokens=None
) -> tuple[list[Example], DataStats]:
    """Every record of the files, tokenized and cut to max_length (cuts are counted, never silent);
    samples left without any label are dropped and listed. A bad record stops with an error naming
    its file and line, or with skip_bad is passed over and listed."""
    stats, out = DataStats(), []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        base_dir = Path(path).parent if Path(path).is_file() else Path(path)
        for where, record in _records(path, stats if skip_bad else None):
            try:
                ex = tokenize(tok, to_messages(record, where), responses_only, where, media_tokens, base_dir)
                cut = _truncate(ex, max_length, media_tokens, where) if len(ex.ids) > max_length else ex
            except G3nError as e:
                if not skip_bad:
                    raise
                stats.skipped.append(str(e))
                continue
            stats.samples += 1
            stats.truncated += cut is not ex
            ex = cut
            if all(label == IGNORE for label in ex.labels):
                stats.without_labels.append(where)
                continue
            out.append(ex)
    return out, stats


def _truncate(ex: Example, max_length: int, t, where: str) -> Example:
    """Cut to max_length keeping only the images/audio wholly before the cut; a cut through one is
    an error (its soft tokens would no longer match its features)."""
    kept = ex.ids[:max_length]
    if not ex.media:
        return Example(kept, ex.labels[:max_length])
    images, clips = kept.count(t.eoi), kept.count(t.eoa)
    if kept.count(t.boi) != images or kept.count(t.boa) != clips:
        raise G3nError(f"{where}: {len(ex.ids)} tokens; max_length {max_length} would cut through an image/audio")
    media, seen = [], {"image": 0, "audio": 0}
    for kind, path in ex.media:
        seen[kind] += 1
        if seen[kind] <= (images if kind == "image" else clips):
            media.append((kind, path))
    return Example(kept, ex.labels[:max_length], tuple(media))


def _records(path, stats: DataStats | None):
    """read_records, but with stats given, lines that are not valid JSON are skipped and listed."""
    if stats is None or Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        yield from read_records(path)
        return
    for n, line in _lines(Path(path), stats):
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            stats.skipped.append(f"{path}:{n}: not valid JSON ({e.msg})")


@dataclass
class PackedRow:
    ids: list[int]
    labels: list[int]
    segment_ids: list[int]
    media: list[tuple[str, str]] = field(default_factory=list)  # in row order


def pack(examples: list[Example], max_length: int) -> list[PackedRow]:
    """Greedy first-fit packing of whole examples into rows of at most max_length tokens.

    Each example keeps its own segment id; the model restarts positions and blocks attention at
    segment borders, and every example starts with an unlabelled BOS, so no loss crosses samples.
    """
    rows: list[PackedRow] = []
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        if len(ex.ids) > max_length:
            raise G3nError(f"an example of {len(ex.ids)} tokens is longer than max_length {max_length}")
        for row in rows:
            if len(row.ids) + len(ex.ids) <= max_length:
                break
        else:
            row = PackedRow([], [], [])
            rows.append(row)
        seg = (row.segment_ids[-1] + 1) if row.segment_ids else 0
        row.ids += ex.ids
        row.labels += ex.labels
        row.segment_ids += [seg] * len(ex.ids)
        row.media += ex.media
    return rows
