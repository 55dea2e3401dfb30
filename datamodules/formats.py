"""Readers (file -> (source, line, record)) and adapters (record -> one data shape).

Every record carries its file and line so that a bad one can be named exactly. With
``on_error="skip"`` a bad record is counted in a :class:`SkipCounter` instead of raising,
and the count is reported at the end of the run.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import difflib
import gzip
import json
import lzma
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
FORMATS = ("jsonl", "json", "parquet", "csv", "tsv", "txt")
# Compressed files are read transparently by their last suffix (``train.jsonl.xz``, ``corpus.txt.gz``).
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
# What a file's first bytes say it is, for the binary formats a misnamed file most often is: a text reader handed
# one would decode it into garbage lines (skipped one by one under on_error=skip, or worse, read as text).
RENAME_COMPRESSED = "rename it to {name}.%s (compressed files are read by their last suffix)"
SIGNATURES = {
    "gzip": (re.compile(rb"\x1f\x8b"), RENAME_COMPRESSED % "gz"),
    "xz": (re.compile(rb"\xfd7zXZ\x00"), RENAME_COMPRESSED % "xz"),
    "bz2": (re.compile(rb"BZh[1-9]1AY&SY"), RENAME_COMPRESSED % "bz2"),
    "zstd": (re.compile(rb"\x28\xb5\x2f\xfd"), "decompress it first (zstd is not read)"),
    "zip": (re.compile(rb"PK\x03\x04"), "unzip it first"),
    "parquet": (re.compile(rb"PAR1"), "rename it to {stem}.parquet or set data.format to parquet"),
}
SNIFF_BYTES = 8192  # how much of a file's (decompressed) start is checked for a signature or NUL bytes
NEAR_MISS = 0.75  # difflib similarity at which an unread field is taken for a misspelling of a missing one
csv.field_size_limit(sys.maxsize)  # documents can be long; the default 128 KiB limit would reject them
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "人类": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "助手": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A bad record: names the file, the line (1-based) and the field."""

    def __init__(self, source: str, line: int | None, message: str, field: str | None = None):
        where = f"{source}:{line}" if line is not None else source
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.source, self.line, self.field = source, line, field


@dataclass
class SkipCounter:
    """Counts records skipped under ``on_error=skip`` (by reason) and samples dropped on purpose, and the fields
    that records carry but no adapter reads (``ignored_fields``: field name -> records), so that metadata left out
    of training (an ``id``, a ``category``) is reported rather than dropped unseen."""

    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    ignored_fields: Counter = field(default_factory=Counter)

    def add(self, reason: str, error: Exception | None = None) -> None:
        self.skipped[reason] += 1
        if error is not None and len(self.first_errors) < 5:
            self.first_errors.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        ignored = ", ".join(f"{name} ({n} records)" for name, n in sorted(self.ignored_fields.items()))
        ignored = f"; fields no adapter reads, ignored: {ignored}" if ignored else ""
        if not self.total:
            return f"no records skipped{ignored}"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        examples = "".join(f"\n  e.g. {e}" for e in self.first_errors)
        return f"skipped {self.total} records ({parts}){ignored}{examples}"


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """The format named in config, or the one the file extension says."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(str(path), None, f"unknown format '{fmt}'; expected one of {FORMATS}")
        return fmt
    name = Path(path).name.lower()
    suffixes = Path(name).suffixes
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]  # the format is the suffix under the compression's (train.jsonl.xz)
    suffix = suffixes[-1].lstrip(".") if suffixes else ""
    if suffix in FORMATS:
        return suffix
    raise DataError(
        str(path),
        None,
        f"unknown format '{''.join(Path(name).suffixes) or name}' (set data.format to "
        f"one of {FORMATS}; {sorted(COMPRESSION)} compression is read by its suffix)",
    )


def open_bytes(path: str | Path):
    """A binary file object, decompressing ``.gz``/``.xz``/``.bz2`` files on the fly (streamed, never whole)."""
    opener = COMPRESSION.get(Path(path).suffix.lower(), open)
    return opener(path, "rb")


def _read_all(path: Path) -> bytes:
    with open_bytes(path) as f:
        return f.read()


def _decode(raw: bytes, source: str, first_line: int) -> str:
    """``raw`` (one line, or a whole file starting at ``first_line``) as UTF-8, without a leading byte order mark.

    A bad byte is named by the line it is on and its position in that line, also when ``raw`` is a whole file
    (a JSON list is decoded at once), so the error points where an editor shows it.
    """
    if first_line == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)  # Excel's "UTF-8" CSV starts with one; it is not part of the text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise DataError(source, line, f"not valid UTF-8 (byte {column}: {raw[e.start : e.start + 1]!r})") from e


def _text_lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """Lines of a text file, decoded one at a time so a bad byte names its line.

    A line that is not UTF-8 comes back as its DataError, so the caller can skip it and go on.
    """
    with open_bytes(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, _decode(raw, str(path), line_no).rstrip("\r\n")
            except DataError as e:
                yield line_no, e


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    for line_no, text in _text_lines(path):
        if isinstance(text, DataError) or not text.strip():
            if isinstance(text, DataError):
                yield line_no, text
            continue
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, DataError(str(path), line_no, f"malformed JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON list; each record is reported by its index (1-based) as 'line'."""
    text = _decode(_read_all(path), str(path), 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(str(path), 1, f"expected a JSON list of records, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _read_delimited(path: Path, delimiter: str, header: bool, columns: list[str] | None) -> Iterator[tuple[int, Any]]:
    """Rows as records, each named by the line it starts on.

    TSV fields are taken verbatim (quotes are text): one row per line. CSV follows RFC 4180: a quoted field may
    hold delimiters, quotes (doubled) and line breaks, so a row may span lines. A quote left open to the end of the
    file is an error whatever ``on_error``: from there on the file cannot be cut into rows.
    """
    kind = "TSV" if delimiter == "\t" else "CSV"
    quoting = csv.QUOTE_NONE if kind == "TSV" else csv.QUOTE_MINIMAL
    bad_lines: dict[int, DataError] = {}  # lines that are not UTF-8, reported with the row that holds them
    ended = False  # every line handed to the csv reader

    def lines() -> Iterator[str]:
        nonlocal ended
        with open_bytes(path) as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    yield _decode(raw, str(path), line_no)
                except DataError as e:
                    bad_lines[line_no] = e
                    yield raw.decode("utf-8", errors="replace")
        ended = True

    reader = csv.reader(lines(), delimiter=delimiter, quoting=quoting, strict=kind == "CSV")
    names = columns
    while True:
        start = reader.line_num + 1
        try:
            row: list[str] | csv.Error = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if ended:  # the file ended inside a quoted field
                raise DataError(
                    str(path), start, f"malformed CSV: a quoted field opened in this row is never closed ({e})"
                ) from e
            row = e
        unreadable = [bad_lines.pop(n) for n in range(start, reader.line_num + 1) if n in bad_lines]
        if unreadable:
            yield unreadable[0].line, unreadable[0]
        elif isinstance(row, csv.Error):
            yield start, DataError(str(path), start, f"malformed {kind} row: {row}")
        elif not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        elif names is None and header:
            names = row
        else:
            names = names or [str(i) for i in range(len(row))]
            if len(row) == len(names):
                yield start, dict(zip(names, row, strict=True))
            else:
                spans = (
                    f" (the row runs to line {reader.line_num}: a quote left open?)" if reader.line_num > start else ""
                )
                message = f"expected {len(names)} columns {names}, found {len(row)}{spans}"
                yield start, DataError(str(path), start, message)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a parquet file, numbered from 1 as 'lines'; a file pyarrow cannot read is named (a whole-file error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    line_no = 0
    with open_bytes(path) as f:
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    line_no += 1
                    yield line_no, record
        except (pa.ArrowException, OSError) as e:  # pyarrow raises OSError for some corrupt files
            after = f" after row {line_no}" if line_no else ""
            raise DataError(str(path), None, f"not a readable parquet file{after} ({type(e).__name__}: {e})") from e


def _refuse_binary(path: Path, kind: str) -> None:
    """Stop at a file whose content is not its format's, whatever ``on_error``: a whole-file problem, not a record's.

    A gzip file named ``.txt`` would otherwise be decoded line by line into garbage (under on_error=skip, the lines
    that happen to be valid UTF-8 would be trained on); NUL bytes mean binary data or UTF-16/32 text.
    """
    with open_bytes(path) as f:
        head = f.read(SNIFF_BYTES)
    for name, (signature, fix) in SIGNATURES.items():
        if name != kind and signature.match(head):
            fix = fix.format(name=path.name, stem=path.name.split(".")[0])
            raise DataError(str(path), None, f"looks like {name} data, not {kind}: {fix}")
    if kind != "parquet" and b"\x00" in head:
        raise DataError(
            str(path), None, f"holds NUL bytes: not {kind} in UTF-8 (binary data, or text saved as UTF-16/32?)"
        )


def _read_txt(path: Path, one_doc_per_line: bool) -> Iterator[tuple[int, Any]]:
    if one_doc_per_line:
        for line_no, text in _text_lines(path):
            if isinstance(text, DataError):
                yield line_no, text
            elif text.strip():
                yield line_no, {"text": text}
    else:
        yield 1, {"text": _decode(_read_all(path), str(path), 1)}


def read_records(
    path: str | Path,
    fmt: str | Mapping[str, Any] = "auto",
    *,
    skips: SkipCounter | None = None,
) -> Iterator[tuple[str, int, Any]]:
    """Yield (source, line, record) from one file, streaming where the format allows.

    ``fmt`` is a format name ("auto": by extension) or a mapping, the ``data.format`` of a
    preset: ``type`` (the format name), ``header`` (csv/tsv: is the first line column names;
    default true), ``columns`` (csv/tsv column names when there is no header), ``fields`` (rename
    record keys to the names the adapters read, e.g. {question: prompt, answer: response}),
    ``one_doc_per_line`` (txt; default true, false: the whole file is one document).

    A line that cannot be read (bad bytes, malformed JSON, wrong column count) raises a
    DataError naming it, or, when ``skips`` is given, is counted there and passed over.
    """
    spec = {"type": fmt} if isinstance(fmt, str) else dict(fmt)
    unknown = set(spec) - {"type", "header", "columns", "fields", "one_doc_per_line"}
    if unknown:
        raise DataError(str(path), None, f"unknown data.format keys {sorted(unknown)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "file not found")
    kind = detect_format(path, spec.get("type", "auto"))
    rename = dict(spec.get("fields") or {})
    line_no = 0
    try:  # a compressed file that is corrupt or cut off fails while it is read: name it
        _refuse_binary(path, kind)
        for line_no, record in _rows(path, kind, spec):
            if isinstance(record, DataError):
                if skips is None:
                    raise record
                skips.add("unreadable lines", record)
                continue
            if rename and isinstance(record, dict):
                record = {rename.get(k, k): v for k, v in record.items()}
            yield str(path), line_no, record
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        after = f" after line {line_no}" if line_no else ""
        raise DataError(str(path), None, f"cannot be read{after}: {type(e).__name__}: {e}") from e


def _rows(path: Path, kind: str, spec: Mapping[str, Any]) -> Iterator[tuple[int, Any]]:
    """(line, record or DataError) from the reader of ``kind``."""
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path)
    if kind in ("csv", "tsv"):
        columns = list(spec["columns"]) if spec.get("columns") else None
        return _read_delimited(path, "," if kind == "csv" else "\t", spec.get("header", True) and not columns, columns)
    if kind == "parquet":
        return _read_parquet(path)
    return _read_txt(path, spec.get("one_doc_per_line", True))


class ReadFields(dict):
    """A record that notes the fields its adapter asks for: with ``get`` or ``[]``, found or not; with ``in``, found.

    The adapters decide by the fields they find which shape a record has, so only they know which fields matter;
    what they never ask for is left out of training, and what they ask for and miss may be a misspelling of a
    field the record does carry (:func:`adapt`).
    """

    def __init__(self, record: dict):
        super().__init__(record)
        self.asked: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        found = super().__contains__(key)
        if found:  # a probe for a field that is absent tells the record's shape, not that the field was expected
            self.asked.add(key)
        return found


def adapt(adapter: Callable[[Any, str, int], T], record: Any, source: str, line: int) -> tuple[T, list[str]]:
    """``adapter(record, source, line)`` and the fields of ``record`` it never read (metadata, to be counted).

    A field it never read that is a near miss of one it looked for and did not find (``inptu`` for ``input``,
    ``Text`` for ``text``) is a misspelling: a DataError naming it, instead of a record trained without its input.
    """
    if not isinstance(record, dict):
        return adapter(record, source, line), []
    tracked = ReadFields(record)
    try:
        result = adapter(tracked, source, line)
    except DataError as error:
        misspelled = _misspelling(tracked, source, line)
        if misspelled:
            raise misspelled from error
        raise
    misspelled = _misspelling(tracked, source, line)
    if misspelled:
        raise misspelled
    return result, [key for key in record if key not in tracked.asked]


def _misspelling(record: ReadFields, source: str, line: int) -> DataError | None:
    """A DataError for the first unread field of ``record`` that is a near miss of a field asked for and missing."""
    missing = {str(key).lower(): key for key in record.asked if not dict.__contains__(record, key)}
    if not missing:
        return None
    for key in record:
        if key in record.asked:
            continue
        near = difflib.get_close_matches(str(key).lower(), missing, n=1, cutoff=NEAR_MISS)
        if near:
            return DataError(
                source,
                line,
                f"not a field this data reads; did you mean '{missing[near[0]]}'? (the record's fields: "
                f"{sorted(record)}; data.format.fields renames fields)",
                field=key,
            )
    return None


def _field(record: Any, name: str, source: str, line: int, required: bool = True) -> str:
    """A string field that must be present and non-empty (unless optional)."""
    if not isinstance(record, dict):
        raise DataError(source, line, f"expected an object with fields, got {type(record).__name__}")
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(source, line, "missing or empty", field=name)
        return ""
    if not isinstance(value, str):
        raise DataError(source, line, f"expected a string, got {type(value).__name__}", field=name)
    return value


def to_text(record: Any, source: str, line: int, text_field: str = "text") -> str:
    """The text shape: one document."""
    return _field(record, text_field, source, line)


def _turns(record: dict, key: str, source: str, line: int, needs_reply: bool = True) -> list[dict]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(source, line, "expected a non-empty list of turns", field=key)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(source, line, "expected an object", field=where)
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise DataError(
                source, line, f"unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}", field=f"{where}.role"
            )
        if not isinstance(content, str) or not content.strip():
            raise DataError(source, line, "missing or empty", field=f"{where}.content")
        message = {"role": ROLE_ALIASES[role], "content": content}
        if isinstance(turn.get("input"), str) and turn["input"].strip():  # an Alpaca turn written back (generate.py)
            message["input"] = turn["input"]
        messages.append(message)
    if needs_reply and not any(m["role"] == "assistant" for m in messages):
        raise DataError(source, line, "no assistant turn to learn from", field=key)
    return messages


def _ranked_best(record: dict, key: str, source: str, line: int) -> str:
    """A response field that may be a list of answers ranked best first (e.g. oasst): the best one."""
    value = record.get(key)
    if isinstance(value, list):
        if not value:
            raise DataError(source, line, "empty list of ranked answers", field=key)
        return _field({f"{key}[0]": value[0]}, f"{key}[0]", source, line)
    return _field(record, key, source, line)


def _history(record: dict, source: str, line: int) -> list[dict]:
    """Earlier turns given as ``history: [[question, answer], ...]`` (LLaMA-Factory's layout)."""
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(source, line, "expected a list of [question, answer] pairs", field="history")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise DataError(
                source, line, "expected a [question, answer] pair of non-empty strings", field=f"history[{i}]"
            )
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _alpaca_user(record: dict, source: str, line: int) -> dict:
    """Alpaca's user turn: the instruction, with a non-empty ``input`` kept as its own key."""
    user = {"role": "user", "content": _field(record, "instruction", source, line)}
    extra = _field(record, "input", source, line, required=False)
    if extra:
        user["input"] = extra
    return user


def to_messages(record: Any, source: str, line: int) -> list[dict]:
    """The prompt/response shape as a list of chat messages.

    Alpaca {instruction, input, output} becomes one user turn (``input`` kept as its own key so
    the Alpaca template can print it under ``### Input``) and one assistant turn, after any
    ``history`` pairs; an ``output`` list is read as answers ranked best first and the best one is
    the response. {prompt, response} becomes one user and one assistant turn. ``messages`` or
    ``conversations`` lists are read turn by turn; preference records whose conversation ends with
    the user take their ``chosen`` answer as the response.
    """
    if not isinstance(record, dict):
        raise DataError(source, line, f"expected an object with fields, got {type(record).__name__}")
    for key in ("messages", "conversations"):
        if key in record:
            messages = _turns(record, key, source, line, needs_reply="chosen" not in record)
            if messages[-1]["role"] != "assistant" and "chosen" in record:
                messages.append({"role": "assistant", "content": _answer(record, "chosen", source, line)})
            return messages
    if "instruction" in record:
        user = _alpaca_user(record, source, line)
        reply = {"role": "assistant", "content": _ranked_best(record, "output", source, line)}
        return [*_history(record, source, line), user, reply]
    if "prompt" in record:
        return [
            {"role": "user", "content": _field(record, "prompt", source, line)},
            {"role": "assistant", "content": _field(record, "response", source, line)},
        ]
    raise DataError(
        source,
        line,
        f"cannot tell the record's shape from its fields {sorted(record)}; expected instruction/input/output, "
        "prompt/response, messages or conversations (data.format.fields renames fields)",
    )


def _answer(record: dict, key: str, source: str, line: int) -> str:
    """A preference answer: a string, or one assistant turn {from|role, value|content} (LLaMA-Factory's DPO data)."""
    value = record.get(key)
    if not isinstance(value, dict):
        return _field(record, key, source, line)
    role = value.get("role", value.get("from"))
    if ROLE_ALIASES.get(role) != "assistant":
        raise DataError(source, line, f"expected an assistant turn, got role {role!r}", field=f"{key}.role")
    return _field({f"{key}.content": value.get("content", value.get("value"))}, f"{key}.content", source, line)


def _preference_prompt(record: dict, source: str, line: int) -> list[dict]:
    """The prompt of a preference record: its conversation, ending with the user turn the answers reply to."""
    for key in ("messages", "conversations"):
        if key in record:
            messages = _turns(record, key, source, line, needs_reply=False)
            if messages[-1]["role"] != "user":
                raise DataError(
                    source,
                    line,
                    f"expected the conversation to end with a user turn, not "
                    f"{messages[-1]['role']!r} (the answers are in chosen/rejected)",
                    field=key,
                )
            return messages
    if "instruction" in record:
        return [*_history(record, source, line), _alpaca_user(record, source, line)]
    if "prompt" in record:
        return [{"role": "user", "content": _field(record, "prompt", source, line)}]
    raise DataError(
        source,
        line,
        f"cannot tell the record's shape from its fields {sorted(record)}; expected prompt/chosen/rejected, "
        "instruction/input/chosen/rejected, instruction/input/output (a list ranked best first), or messages or "
        "conversations ending with the user plus chosen/rejected (data.format.fields renames fields)",
    )


def _ranked_pairs(record: dict, source: str, line: int) -> list[tuple[str, str]]:
    """(best, other) for every lower-ranked answer of an ``output`` list ranked best first."""
    answers = record["output"]
    for i, answer in enumerate(answers):
        if answer is not None and not isinstance(answer, str):
            raise DataError(source, line, f"expected a string, got {type(answer).__name__}", field=f"output[{i}]")
    given = [i for i, answer in enumerate(answers) if answer and answer.strip()]
    if len(given) < 2:
        raise DataError(
            source, line, "a ranked list needs at least 2 non-empty answers to make a preference pair", field="output"
        )
    best = _ranked_best(record, "output", source, line)  # the best one must be there, not only lower ones
    others = [(i, answers[i]) for i in given if i > 0]
    for i, other in others:
        if other.strip() == best.strip():
            raise DataError(
                source, line, "chosen and rejected are identical (same answer as output[0])", field=f"output[{i}]"
            )
    return [(best, other) for _, other in others]


def to_preference(record: Any, source: str, line: int) -> list[tuple[list[dict], str, str]]:
    """The preference shape: (prompt messages ending with a user turn, chosen answer, rejected answer) pairs.

    The prompt is read like :func:`to_messages` reads it: {prompt}, Alpaca {instruction, input} after any
    ``history`` pairs, or a ``messages``/``conversations`` list (which must end with the user). The answers
    are ``chosen`` and ``rejected``, strings or assistant turn objects (one pair; an Alpaca ``output`` beside
    them is ignored), or, with neither
    given, an ``output`` list ranked best first: one pair (best, other) for every lower-ranked answer.
    """
    if not isinstance(record, dict):
        raise DataError(source, line, f"expected an object with fields, got {type(record).__name__}")
    prompt = _preference_prompt(record, source, line)
    if "chosen" not in record and "rejected" not in record and isinstance(record.get("output"), list):
        return [(prompt, best, other) for best, other in _ranked_pairs(record, source, line)]
    chosen = _answer(record, "chosen", source, line)
    rejected = _answer(record, "rejected", source, line)
    if chosen.strip() == rejected.strip():
        raise DataError(source, line, "chosen and rejected are identical")
    return [(prompt, chosen, rejected)]
