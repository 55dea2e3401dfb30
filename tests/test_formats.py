"""Every reader yields the same records with their line numbers; adapters map each layout to messages."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA

from datamodules.formats import read_records, to_messages

ROWS = [{"prompt": "1+1=", "response": "2"}, {"prompt": "你好", "response": "你好！"}]


def write(path, fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text("prompt" + sep + "response\n" + "".join(f"{r['prompt']}{sep}{r['response']}\n" for r in ROWS))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "tsv"])
def test_every_format_reads_the_same_records(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    write(path, fmt)
    records = list(read_records(path))
    assert [r for _, _, r in records] == ROWS
    assert [line for _, line, _ in records] == ([2, 3] if fmt in ("csv", "tsv") else [1, 2])


def test_tsv_without_header_takes_column_names_from_config(tmp_path):
    path = tmp_path / "spam.tsv"
    path.write_text("ham\thello there\nspam\tWIN now\n")
    rows = [r for _, _, r in read_records(path, {"type": "tsv", "columns": ["label", "text"]})]
    assert rows == [{"label": "ham", "text": "hello there"}, {"label": "spam", "text": "WIN now"}]


def test_txt_is_one_document_per_line_skipping_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\n\nsecond doc\n")
    assert [(line, r["text"]) for _, line, r in read_records(path)] == [(1, "first doc"), (3, "second doc")]


def test_adapters_map_alpaca_prompt_response_and_chat_layouts():
    alpaca = to_messages({"instruction": "Add.", "input": "1 + 2", "output": "3"}, "f", 1)
    assert alpaca == [{"role": "user", "content": "Add.", "input": "1 + 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"instruction": "Hi.", "input": "", "output": "Hello"}, "f", 1)[0] == {
        "role": "user",
        "content": "Hi.",
    }
    chat = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "f", 1)
    assert chat == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_shared_alpaca_en_reads_as_messages():
    path = SHARED_DATA / "alpaca_en_instruction" / "instruction-data.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    records = [to_messages(r, s, line) for s, line, r in read_records(path)]
    assert len(records) == 1100
    assert all(m[-1]["role"] == "assistant" for m in records)


def test_history_and_ranked_outputs_become_turns_and_the_best_answer():
    record = {
        "instruction": "再说一遍",
        "input": "",
        "output": ["最好的回答", "次好的回答"],
        "history": [["你好", "你好！"]],
    }
    assert to_messages(record, "f", 1) == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再说一遍"},
        {"role": "assistant", "content": "最好的回答"},
    ]


def test_preference_conversation_takes_chosen_as_the_reply():
    record = {"conversations": [{"from": "human", "value": "q"}], "chosen": "good", "rejected": "bad"}
    assert to_messages(record, "f", 1)[-1] == {"role": "assistant", "content": "good"}


@pytest.mark.parametrize(
    "record, field",
    [
        ({"instruction": "x", "output": []}, "output"),
        ({"instruction": "x", "output": "y", "history": [["only question"]]}, "history[0]"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "conversations"),
    ],
)
def test_bad_history_ranking_or_missing_reply_names_the_field(record, field):
    from datamodules.formats import DataError

    with pytest.raises(DataError, match=rf"f:7: field '{re.escape(field)}'"):
        to_messages(record, "f", 7)


def test_tsv_keeps_quotes_verbatim_and_fields_can_be_renamed(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('q\ta\n"quoted" start\the said "hi"\n')
    spec = {"type": "tsv", "fields": {"q": "prompt", "a": "response"}}
    assert [r for _, _, r in read_records(path, spec)] == [{"prompt": '"quoted" start', "response": 'he said "hi"'}]


def test_a_csv_field_quoted_across_lines_is_one_record_named_by_its_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\nq,"first line\nsecond, with a comma"\nx,"he said ""hi"""\n')
    rows = [(line, r) for _, line, r in read_records(path)]
    assert rows == [
        (2, {"prompt": "q", "response": "first line\nsecond, with a comma"}),
        (4, {"prompt": "x", "response": 'he said "hi"'}),
    ]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,response\n你好,你好！\n".encode())
    assert [r for _, _, r in read_records(path)] == [{"prompt": "你好", "response": "你好！"}]
