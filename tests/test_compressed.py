"""Compressed data files (.gz, .xz, .bz2) read record for record like the plain file, in every format."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.formats import DataError, detect_format, read_records

COMPRESSORS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}
ROWS = [{"instruction": "把数字相加", "input": "3 和 4", "output": "7"}, {"instruction": "说你好", "output": "你好"}]


def plain_files(tmp_path) -> dict[str, bytes]:
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), table)
    return {
        "rows.jsonl": jsonl.encode(),
        "rows.json": json.dumps(ROWS, ensure_ascii=False).encode(),
        "rows.tsv": "摘要一\t正文一\n摘要二\t正文二\n".encode(),
        "rows.txt": "第一篇文档。\n\n第二篇文档。\n".encode(),
        "rows.parquet": table.read_bytes(),
    }


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_compressed_files_read_identically_to_plain_ones(tmp_path, suffix):
    fmt = {"rows.tsv": {"type": "tsv", "columns": ["response", "prompt"]}}
    for name, data in plain_files(tmp_path).items():
        plain = tmp_path / f"plain_{name}"
        plain.write_bytes(data)
        packed = tmp_path / f"packed_{name}{suffix}"
        packed.write_bytes(COMPRESSORS[suffix](data))
        spec = fmt.get(name, "auto")
        expected = [(line, record) for _, line, record in read_records(plain, spec)]
        assert expected, name
        assert [(line, record) for _, line, record in read_records(packed, spec)] == expected, name


def test_format_is_read_under_the_compression_suffix():
    assert detect_format("corpus/train.jsonl.xz") == "jsonl"
    assert detect_format("a.TXT.GZ") == "txt"
    with pytest.raises(DataError, match=r"unknown format '\.xz'"):
        detect_format("archive.xz")


def test_a_bad_line_in_a_compressed_file_is_named(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": \n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: malformed JSON"):
        list(read_records(path))
