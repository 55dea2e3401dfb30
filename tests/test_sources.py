"""Mixture sources: entries parse with clear errors, weights set sample counts, placeholders are filled."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from datamodules.formats import DataError, SkipCounter, to_messages
from datamodules.sources import Source, adapted_records, fill_placeholders, parse_sources, weighted


def test_entries_parse_to_sources_with_their_names():
    sources = parse_sources(
        [
            "data/wiki.txt",
            {"path": "data/laws.jsonl.xz", "weight": 0.2},
            {"path": "x/identity.json", "name": "self", "fill": {"{{name}}": "小林"}},
        ]
    )
    assert [s.label for s in sources] == ["wiki", "laws", "self"]
    assert sources[1].weight == 0.2 and sources[0].weight == 1.0
    assert sources[2].fill == {"{{name}}": "小林"}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"weight": 2}, r"train_files\[0\]: expected a path or a mapping with 'path'"),
        ({"path": "a.txt", "weigth": 2}, r"train_files\[0\]: unknown keys \['weigth'\]"),
        ({"path": "a.txt", "weight": 0}, r"train_files\[0\]\.weight: expected a number > 0"),
    ],
)
def test_bad_entries_name_their_position_and_key(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_sources([entry])


def test_two_sources_with_one_name_are_refused():
    with pytest.raises(ValueError, match=r"share the names \['train'\]"):
        parse_sources(["a/train.jsonl", "b/train.jsonl"])


@pytest.mark.parametrize("weight, count", [(1, 40), (2, 80), (0.25, 10), (2.5, 100)])
def test_weight_sets_the_sample_count(weight, count):
    items = list(range(40))
    out = weighted(items, weight, seed=0)
    assert len(out) == count
    assert set(out) <= set(items)
    assert weighted(items, weight, seed=0) == out  # seeded
    if weight < 1:
        assert out == sorted(out) and len(set(out)) == count  # a subset, order kept


def test_placeholders_are_filled_in_nested_records():
    record = {
        "conversations": [
            {"from": "human", "value": "你是谁？"},
            {"from": "gpt", "value": "我是{{name}}，由{{author}}训练。"},
        ],
        "n": 3,
    }
    filled = fill_placeholders(record, {"{{name}}": "小林", "{{author}}": "lmlab"})
    assert filled["conversations"][1]["value"] == "我是小林，由lmlab训练。"
    assert filled["n"] == 3 and record["conversations"][1]["value"].startswith("我是{{name}}")
    assert Source("a.json").fill == {}


def test_adapted_records_reads_each_source_its_way_and_yields_what_the_adapter_rejects(tmp_path):
    """One reader for the datamodules and generate.py: per-source format and fill; adapter errors are yielded."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        '{"instruction": "你是谁？", "output": "我是{{name}}。"}\nnot json\n{"instruction": "x", "output": ""}\n',
        encoding="utf-8",
    )
    table = tmp_path / "pairs.tsv"
    table.write_text("q\ta\n", encoding="utf-8")
    sources = [
        Source(str(chat), fill={"{{name}}": "小林"}),
        Source(str(table), format={"type": "tsv", "columns": ["prompt", "response"]}),
    ]
    skips = SkipCounter()
    items = list(adapted_records(sources, "auto", to_messages, skips))
    assert [(Path(s).name, n) for s, n, _ in items] == [("chat.jsonl", 1), ("chat.jsonl", 3), ("pairs.tsv", 1)]
    assert items[0][2][-1] == {"role": "assistant", "content": "我是小林。"}
    assert isinstance(items[1][2], DataError) and "field 'output'" in str(items[1][2])
    assert items[2][2][0] == {"role": "user", "content": "q"}
    assert skips.skipped == {"unreadable lines": 1}
    # without a counter an unreadable line raises; plain paths read in the given format
    with pytest.raises(DataError, match="chat.jsonl:2: malformed JSON"):
        list(adapted_records([str(chat)], "jsonl", to_messages))


def test_fields_no_adapter_reads_are_counted_and_a_near_miss_of_a_missing_one_is_rejected(tmp_path):
    """Metadata beside the fields an adapter reads is counted (it is left out of training); a misspelling of a field
    the adapter looked for and missed is a bad record naming both, not a record silently read without it."""
    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"instruction": "Add.", "input": "1 + 2", "output": "3", "id": 7}\n'
        '{"instruction": "Add.", "inptu": "1 + 2", "output": "3", "id": 8}\n',
        encoding="utf-8",
    )
    ignored = Counter()
    items = list(adapted_records([str(path)], "auto", to_messages, ignored=ignored))
    assert items[0][2][0] == {"role": "user", "content": "Add.", "input": "1 + 2"}
    assert isinstance(items[1][2], DataError)
    assert f"{path}:2: field 'inptu'" in str(items[1][2]) and "did you mean 'input'" in str(items[1][2])
    assert ignored == {"id": 1}
    assert "ignored: id (1 records)" in SkipCounter(ignored_fields=ignored).report()


def test_metadata_named_like_a_shape_probe_is_ignored_not_a_misspelling(tmp_path):
    """Adapters probe for other record shapes (``"conversations" in record``); a field near such a probe, e.g. an
    export's conversation_id or message_id, is metadata, counted as ignored, not a misspelling."""
    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"instruction": "Add.", "input": "1 + 2", "output": "3", "conversation_id": 7}\n'
        '{"prompt": "Add.", "response": "3", "message_id": 8}\n',
        encoding="utf-8",
    )
    ignored = Counter()
    items = list(adapted_records([str(path)], "auto", to_messages, ignored=ignored))
    assert not [record for _, _, record in items if isinstance(record, DataError)]
    assert ignored == {"conversation_id": 1, "message_id": 1}
