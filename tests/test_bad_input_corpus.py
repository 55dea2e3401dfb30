"""The bad-input corpus: every kind of bad input lmlab knows, each read the way a run reads it.

DESIGN.md principle 4: bad input gets a clear error naming the file, and the line and the field where there are
ones, or, under ``data.on_error=skip``, a count of what was skipped; nothing is silent. Each entry of :data:`KINDS`
is one kind: its files, the datamodule (or loader) that reads them, and what the error must say. Under
``on_error=skip`` a bad record is counted and the rest is read (``under_skip="counted"``); a whole-file problem
raises the same error there too (``"error"``). A few kinds are never errors, only counted (``counted``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import connect, tiny_bpe

from datamodules.classification import ClassificationDataModule
from datamodules.formats import DataError
from datamodules.preference import PreferenceDataModule
from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule
from lmlab.core.tokenizer import load_tokenizer

GOOD = {"instruction": "Add.", "input": "1 + 2", "output": "3"}
PAIR = {"prompt": "1 + 2 =", "chosen": "3", "rejected": "4"}
HAM, SPAM = {"text": "see you at noon", "label": "ham"}, {"text": "WIN a prize now", "label": "spam"}
LONG = {"prompt": "word " * 200, "response": "short"}


def jsonl(*records: dict | bytes) -> bytes:
    """Lines of JSON; a bytes item is written as it is (a broken line)."""
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n" for r in records
    )


def parquet(records: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return buffer.getvalue()


def zipped(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("train.jsonl", data)
    return buffer.getvalue()


def json_with_a_bad_byte_on_line_28() -> bytes:
    """A pretty-printed JSON list (5 lines a record) whose line 28 holds a byte that is not UTF-8."""
    lines = json.dumps([GOOD] * 8, indent=2).encode().split(b"\n")
    lines[27] = lines[27].replace(b'": "', b'": "\xff', 1)
    assert b"\xff" in lines[27]
    return b"\n".join(lines)


def text_lines(n: int) -> bytes:
    return "".join(
        f"Document number {i} says something about sums like {i} + {i} = {2 * i}.\n" for i in range(n)
    ).encode()


@dataclass(frozen=True)
class Run:
    """What a loader needs besides the files: where to write, the tokenizer, ``data.on_error``."""

    tmp_path: Path
    tokenizer: Any
    on_error: str


Load = Callable[[list[str], Run], Any]


def sft(fmt: Any = "auto", max_length: int | None = None) -> Load:
    """SFT reading (and, with ``max_length``, tokenizing) the files, the first one also as the val file."""

    def load(paths: list[str], run: Run) -> SFTDataModule:
        dm = SFTDataModule(train_files=paths, val_files=paths[:1], format=fmt, on_error=run.on_error)
        if max_length is None:
            dm.split()
        else:
            connect(dm, run.tokenizer, max_length=max_length).setup()
        return dm

    return load


def dpo() -> Load:
    def load(paths: list[str], run: Run) -> PreferenceDataModule:
        dm = PreferenceDataModule(train_files=paths, val_files=paths[:1], on_error=run.on_error)
        dm.examples()
        return dm

    return load


def text(fmt: Any = "auto", seq_len: int | None = None, val_fraction: float = 0.05) -> Load:
    """Pretraining: the reading pass (documents, splits), and with ``seq_len`` the token shards and windows."""

    def load(paths: list[str], run: Run) -> PretrainDataModule:
        dm = PretrainDataModule(
            train_files=paths,
            format=fmt,
            val_fraction=val_fraction,
            on_error=run.on_error,
            cache_dir=str(run.tmp_path / "cache"),
        )
        if seq_len is None:
            dm._plan()
        else:
            connect(dm, run.tokenizer, max_length=seq_len)
            dm.prepare_data()
            dm.setup()
        return dm

    return load


def classify(fmt: Any = "auto") -> Load:
    """Classification with ham/spam labels, the first file also as the val and test file."""

    def load(paths: list[str], run: Run) -> ClassificationDataModule:
        dm = ClassificationDataModule(
            train_files=paths,
            labels=["ham", "spam"],
            val_files=paths[:1],
            test_files=paths[:1],
            format=fmt,
            on_error=run.on_error,
        )
        dm.splits()
        return dm

    return load


def tokenizer() -> Load:
    def load(paths: list[str], run: Run) -> None:
        load_tokenizer(paths[0])

    return load


@dataclass(frozen=True)
class Kind:
    """One kind of bad input.

    ``files``: name -> bytes (None: absent; a name ending in "/" is a folder); the first is the one the error must
    name. ``message``, ``line``, ``field``: what the error must say besides the file (``<file>:<line>:``,
    ``field '<field>'``). ``under_skip``: "counted" (under on_error=skip the record is skipped and counted, the rest
    read), "error" (a whole-file problem: the same error), None (no data setting applies). ``counted``: a kind that
    is never an error, only counted: (SkipCounter attribute, key).
    """

    files: dict[str, bytes | None]
    load: Load
    message: str = ""
    line: int | None = None
    field: str | None = None
    under_skip: str | None = "counted"
    counted: tuple[str, str] | None = None


KINDS: dict[str, Kind] = {
    # -- the file as a whole: its name, its bytes, its container ------------------------------------------------
    "unknown extension": Kind({"data.xml": b"<a/>"}, sft(), "unknown format '.xml'", under_skip="error"),
    "unknown format name": Kind({"a.jsonl": jsonl(GOOD)}, sft("yaml"), "unknown format 'yaml'", under_skip="error"),
    "unknown data.format key": Kind(
        {"a.tsv": b"x\ty\n"}, sft({"type": "tsv", "colums": ["a"]}), "unknown data.format keys", under_skip="error"
    ),
    "missing file": Kind({"nope.jsonl": None}, sft(), "file not found", under_skip="error"),
    "empty file in a mixture": Kind(
        {"empty.jsonl": b"", "good.jsonl": jsonl(GOOD)}, sft(), "no records", under_skip="error"
    ),
    "empty text file": Kind({"empty.txt": b"\n\n"}, text(), "no records", under_skip="error"),
    "gzip named .txt": Kind(
        {"corpus.txt": gzip.compress(text_lines(50))}, text(), "looks like gzip data", under_skip="error"
    ),
    "xz named .jsonl": Kind({"a.jsonl": lzma.compress(jsonl(GOOD))}, sft(), "looks like xz data", under_skip="error"),
    "bz2 named .csv": Kind(
        {"a.csv": bz2.compress(b"prompt,response\na,b\n")}, sft(), "looks like bz2", under_skip="error"
    ),
    "zip named .json": Kind({"a.json": zipped(jsonl(GOOD))}, sft(), "looks like zip data", under_skip="error"),
    "parquet named .jsonl": Kind({"a.jsonl": parquet([GOOD])}, sft(), "looks like parquet data", under_skip="error"),
    "gzip named .parquet": Kind(
        {"a.parquet": gzip.compress(parquet([GOOD]))}, sft(), "looks like gzip", under_skip="error"
    ),
    "UTF-16 text": Kind({"corpus.txt": "第一行\n第二行\n".encode("utf-16")}, text(), "NUL bytes", under_skip="error"),
    "zero-byte parquet": Kind({"a.parquet": b""}, sft(), "not a readable parquet file", under_skip="error"),
    "corrupt parquet": Kind(
        {"a.parquet": b"PAR1" + b"\x00" * 64 + b"PAR1"}, sft(), "not a readable parquet file", under_skip="error"
    ),
    "truncated gzip": Kind(
        {"a.txt.gz": gzip.compress(text_lines(2000))[:3000]}, text(), "cannot be read after line", under_skip="error"
    ),
    "plain file named .gz": Kind({"a.jsonl.gz": jsonl(GOOD)}, sft(), "Not a gzipped file", under_skip="error"),
    # -- lines and rows --------------------------------------------------------------------------------------------
    "malformed JSON line": Kind({"a.jsonl": jsonl(GOOD, b'{"instruction": "x",', GOOD)}, sft(), "malformed JSON", 2),
    "non-UTF-8 JSONL line": Kind(
        {"a.jsonl": jsonl(GOOD, b'{"instruction": "\xff"}', GOOD)}, sft(), "not valid UTF-8", 2
    ),
    "JSONL line not an object": Kind({"a.jsonl": jsonl(GOOD, b"[1, 2]")}, sft(), "expected an object with fields", 2),
    "malformed JSON list": Kind(
        {"a.json": b'[{"instruction": "x", "output": "y"},\n {"output": }]'},
        sft(),
        "malformed JSON",
        2,
        under_skip="error",
    ),
    "JSON that is not a list": Kind(
        {"a.json": json.dumps(GOOD).encode()}, sft(), "expected a JSON list", 1, under_skip="error"
    ),
    "JSON list with a bad byte on line 28": Kind(
        {"a.json": json_with_a_bad_byte_on_line_28()}, sft(), "not valid UTF-8", 28, under_skip="error"
    ),
    "CSV row with too few columns": Kind({"a.csv": b"prompt,response\na,b\nbroken\n"}, sft(), "expected 2 columns", 3),
    "TSV row with too many columns": Kind(
        {"a.tsv": b"prompt\tresponse\na\tb\nc\td\te\n"}, sft(), "expected 2 columns", 3
    ),
    "CSV quote left open to the end": Kind(
        {"a.csv": b'prompt,response\na,b\n"never closed,x\nc,d\n'}, sft(), "never closed", 3, under_skip="error"
    ),
    "CSV bad row after a quoted line break": Kind(
        {"a.csv": b'prompt,response\n"two\nlines",ok\nbroken\n'}, sft(), "expected 2 columns", 4
    ),
    "CSV text after a closing quote": Kind({"a.csv": b'prompt,response\na,b\n"a"b,c\n'}, sft(), "malformed CSV row", 3),
    "non-UTF-8 CSV row": Kind({"a.csv": b"prompt,response\na,b\nc,\xc3\x28\n"}, sft(), "not valid UTF-8", 3),
    "non-UTF-8 text line": Kind(
        {"corpus.txt": b"good line\nanother\nbad \xc3\x28 bytes\n"}, text(), "not valid UTF-8", 3
    ),
    # -- records: fields and their shapes -----------------------------------------------------------------------
    "missing response": Kind({"a.jsonl": jsonl(GOOD, {"instruction": "x"})}, sft(), "missing or empty", 2, "output"),
    "blank instruction": Kind(
        {"a.jsonl": jsonl(GOOD, {"instruction": "  ", "output": "y"})}, sft(), "missing or empty", 2, "instruction"
    ),
    "field of the wrong type": Kind(
        {"a.jsonl": jsonl(GOOD, {"instruction": "x", "output": 3})}, sft(), "expected a string, got int", 2, "output"
    ),
    "misspelled optional field": Kind(
        {"a.jsonl": jsonl(GOOD, {"instruction": "Add.", "inptu": "1 + 2", "output": "3"})},
        sft(),
        "did you mean 'input'",
        2,
        "inptu",
    ),
    "misspelled required field": Kind(
        {"a.jsonl": jsonl(GOOD, {"instruction": "Add.", "ouptut": "3"})}, sft(), "did you mean 'output'", 2, "ouptut"
    ),
    "record of no known shape": Kind(
        {"a.jsonl": jsonl(GOOD, {"question": "?", "answer": "!"})}, sft(), "cannot tell the record's shape", 2
    ),
    "unknown role": Kind(
        {"a.jsonl": jsonl(GOOD, {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]})},
        sft(),
        "unknown role 'robot'",
        2,
        "messages[1].role",
    ),
    "empty conversation": Kind(
        {"a.jsonl": jsonl(GOOD, {"messages": []})}, sft(), "non-empty list of turns", 2, "messages"
    ),
    "conversation without a reply": Kind(
        {"a.jsonl": jsonl(GOOD, {"conversations": [{"from": "human", "value": "q"}]})},
        sft(),
        "no assistant turn",
        2,
        "conversations",
    ),
    "turn without content": Kind(
        {"a.jsonl": jsonl(GOOD, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]})},
        sft(),
        "missing or empty",
        2,
        "messages[0].content",
    ),
    "history entry not a pair": Kind(
        {"a.jsonl": jsonl(GOOD, {**GOOD, "history": [["only a question"]]})},
        sft(),
        "[question, answer]",
        2,
        "history[0]",
    ),
    "empty ranked answers": Kind(
        {"a.jsonl": jsonl(GOOD, {"instruction": "x", "output": []})}, sft(), "empty list of ranked answers", 2, "output"
    ),
    # -- preference pairs ----------------------------------------------------------------------------------------
    "chosen equal to rejected": Kind({"p.jsonl": jsonl(PAIR, {**PAIR, "rejected": "3"})}, dpo(), "are identical", 2),
    "missing rejected answer": Kind(
        {"p.jsonl": jsonl(PAIR, {"prompt": "q", "chosen": "a"})}, dpo(), "missing or empty", 2, "rejected"
    ),
    "misspelled rejected answer": Kind(
        {"p.jsonl": jsonl(PAIR, {"prompt": "q", "chosen": "a", "rejcted": "b"})},
        dpo(),
        "did you mean 'rejected'",
        2,
        "rejcted",
    ),
    "preference prompt ending with a reply": Kind(
        {
            "p.jsonl": jsonl(
                PAIR,
                {
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "chosen": "b",
                    "rejected": "c",
                },
            )
        },
        dpo(),
        "end with a user turn",
        2,
        "conversations",
    ),
    "ranked list of one answer": Kind(
        {"p.jsonl": jsonl(PAIR, {"instruction": "x", "output": ["only one"]})}, dpo(), "at least 2", 2, "output"
    ),
    "chosen turn not the assistant's": Kind(
        {"p.jsonl": jsonl(PAIR, {"prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"})},
        dpo(),
        "expected an assistant turn",
        2,
        "chosen.role",
    ),
    # -- labelled text -------------------------------------------------------------------------------------------
    "unknown label": Kind(
        {"c.jsonl": jsonl(HAM, SPAM, {"text": "x", "label": "eggs"})}, classify(), "unknown label 'eggs'", 3, "label"
    ),
    "label id out of range": Kind(
        {"c.jsonl": jsonl(HAM, SPAM, {"text": "x", "label": 5})}, classify(), "unknown label 5", 3, "label"
    ),
    "misspelled label field": Kind(
        {"c.jsonl": jsonl(HAM, SPAM, {"text": "x", "lable": "ham"})}, classify(), "did you mean 'label'", 3, "lable"
    ),
    "a single class": Kind(
        {"c.jsonl": jsonl(HAM, HAM, HAM)},
        classify(),
        "every training example has the label 'ham'",
        None,
        "label",
        "error",
    ),
    # -- pretraining text ----------------------------------------------------------------------------------------
    "missing text field": Kind(
        {"t.jsonl": jsonl({"text": "ok"}, {"body": "x"})}, text(), "missing or empty", 2, "text"
    ),
    "misspelled text field": Kind(
        {"t.jsonl": jsonl({"text": "ok"}, {"txet": "x"})}, text(), "did you mean 'text'", 2, "txet"
    ),
    "text shorter than one window": Kind(
        {"short.txt": text_lines(3)}, text(seq_len=256), "fewer than one window", under_skip="error"
    ),
    "nothing held out for validation": Kind(
        {"corpus.txt": text_lines(40)},
        text(seq_len=16, val_fraction=0.0),
        "raise data.val_fraction",
        under_skip="error",
    ),
    # -- samples after truncation --------------------------------------------------------------------------------
    "every sample truncated to no answer": Kind(
        {"long.jsonl": jsonl(LONG, LONG)}, sft(max_length=32), "after truncation to seq_len=32", under_skip="error"
    ),
    # -- tokenizers ----------------------------------------------------------------------------------------------
    "tokenizer folder without a tokenizer": Kind(
        {"model/": None, "model/config.json": b"{}"}, tokenizer(), "no tokenizer in", under_skip=None
    ),
    "tokenizer path that does not exist": Kind({"nowhere": None}, tokenizer(), "does not exist", under_skip=None),
    "tokenizer path to a file": Kind({"tokenizer.json": b"{}"}, tokenizer(), "give the folder", under_skip=None),
    # -- never errors, only counted ------------------------------------------------------------------------------
    "fields no adapter reads": Kind(
        {"t.jsonl": jsonl({"text": "ok", "category": "news"})}, text(), counted=("ignored_fields", "category")
    ),
    "some samples truncated to no answer": Kind(
        {"a.jsonl": jsonl(GOOD, LONG)},
        sft(max_length=64),
        counted=("skipped", "samples with no answer token left after truncation to 64"),
    ),
}


def write(tmp_path: Path, files: dict[str, bytes | None]) -> list[str]:
    """The kind's files under tmp_path (absent ones not written); their paths, folders without the slash."""
    for name, data in files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        elif data is not None:
            (tmp_path / name).write_bytes(data)
    return [str(tmp_path / name.rstrip("/")) for name in files if "/" not in name.rstrip("/")]


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe("byte")


def test_the_corpus_holds_at_least_40_kinds():
    assert len(KINDS) >= 40


@pytest.mark.parametrize("name", KINDS)
def test_bad_input_is_named_or_counted(name, tmp_path, bpe):
    kind = KINDS[name]
    paths = write(tmp_path, kind.files)
    if kind.counted:
        dm = kind.load(paths, Run(tmp_path, bpe, "raise"))
        attribute, key = kind.counted
        assert getattr(dm.skips, attribute)[key] >= 1, dm.skips.report()
        assert key in dm.skips.report()
        return
    with pytest.raises((DataError, ValueError, OSError)) as err:
        kind.load(paths, Run(tmp_path, bpe, "raise"))
    message = str(err.value)
    assert paths[0] in message, message
    assert kind.message in message, message
    if kind.line is not None:
        assert f"{paths[0]}:{kind.line}:" in message, message
    if kind.field is not None:
        assert f"field '{kind.field}'" in message, message
    if kind.under_skip == "error":
        with pytest.raises((DataError, ValueError, OSError), match=re.escape(kind.message)):
            kind.load(paths, Run(tmp_path / "skip", bpe, "skip"))
    elif kind.under_skip == "counted":
        dm = kind.load(paths, Run(tmp_path / "skip", bpe, "skip"))
        assert dm.skips.total >= 1
        assert any(f"{paths[0]}:{kind.line}:" in e and kind.message in e for e in dm.skips.first_errors), (
            dm.skips.report()
        )
