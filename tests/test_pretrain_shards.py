"""Pretraining token shards: exact round trip, the same bytes for any num_proc and after a crash, bad input named
or counted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import connect
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import datamodules.shards
from datamodules.formats import DataError
from datamodules.pretrain import PretrainDataModule

DOCS = [
    f"document {i}: the cat sat on mat {i}." if i % 3 else f"第{i}篇：三加四等于七，你好世界。" * (i % 7 + 1)
    for i in range(60)
]


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE made with the tokenizers library here, so these tests do not move with conf/bpe."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        DOCS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def prepared(tokenizer, files: list[Path], cache: Path, **kwargs) -> PretrainDataModule:
    """A datamodule whose prepare_data has run; small shards so even a tiny corpus has several."""
    dm = PretrainDataModule(train_files=[str(f) for f in files], cache_dir=str(cache), **{"shard_mb": 0.0005, **kwargs})
    connect(dm, tokenizer, max_length=8)
    dm.prepare_data()
    return dm


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def decoded_docs(dm: PretrainDataModule, split: str) -> list[str]:
    """The documents of a split, read back from its shards: split at EOS, decoded."""
    meta = json.loads((dm.token_dir / "meta.json").read_text())
    files = [dm.token_dir / s["file"] for s in meta["shards"] if s["split"] == split]
    ids = [t for f in files for t in np.fromfile(f, dtype=meta["dtype"]).tolist()]
    assert not ids or ids[-1] == meta["eos_id"], "every document ends with EOS"
    docs, start = [], 0
    for end in (i for i, t in enumerate(ids) if t == meta["eos_id"]):
        docs.append(dm.tokenizer.backend_tokenizer.decode(ids[start:end], skip_special_tokens=False))
        start = end + 1
    return docs


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS[:30]) + "\n\n" + "\n".join(DOCS[30:]) + "\n")  # a blank line is no document
    return path


def test_shards_decode_back_to_the_documents_in_order(tmp_path, corpus, tiny_tokenizer):
    dm = prepared(tiny_tokenizer, [corpus], tmp_path / "cache", val_fraction=0.25)
    meta = json.loads((dm.token_dir / "meta.json").read_text())
    train, val = decoded_docs(dm, "train"), decoded_docs(dm, "val")
    assert sorted(train + val) == sorted(DOCS) and 0 < len(val) < len(train)
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val], "order kept"
    assert meta["documents"] == {"train": len(train), "val": len(val)} and meta["skipped"] == {}
    assert len([s for s in meta["shards"] if s["split"] == "train"]) > 3
    assert meta["sources"]["train"] == [{"path": str(corpus), "bytes": corpus.stat().st_size}]
    # Windows read across shard boundaries exactly as from one concatenated file.
    dm.setup()
    stream = np.concatenate(
        [np.fromfile(dm.token_dir / s["file"], dtype=meta["dtype"]) for s in meta["shards"] if s["split"] == "train"]
    )
    assert len(dm.train_set) == (len(stream) - 1) // 8 == (meta["tokens"]["train"] - 1) // 8
    for i in range(len(dm.train_set)):
        assert dm.train_set[i]["input_ids"].tolist() == stream[i * 8 : i * 8 + 9].tolist()


def test_same_bytes_for_any_num_proc(tmp_path, corpus, tiny_tokenizer):
    inline = prepared(tiny_tokenizer, [corpus], tmp_path / "a", num_proc=0)
    pooled = prepared(tiny_tokenizer, [corpus], tmp_path / "b", num_proc=2)
    assert inline.token_dir.name == pooled.token_dir.name, "num_proc is not part of the cache key"
    assert folder_bytes(inline.token_dir) == folder_bytes(pooled.token_dir)


def test_resume_after_a_crash_keeps_finished_shards_and_gives_the_same_bytes(
    tmp_path, corpus, tiny_tokenizer, monkeypatch
):
    clean = prepared(tiny_tokenizer, [corpus], tmp_path / "clean")
    real = datamodules.shards.encode_shard
    calls = []

    def crash_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(datamodules.shards, "encode_shard", crash_on_third_shard)
    with pytest.raises(MemoryError):
        prepared(tiny_tokenizer, [corpus], tmp_path / "crashed")
    crashed_dir = tmp_path / "crashed" / clean.token_dir.name
    survivors = {p.name: p.stat().st_mtime_ns for p in crashed_dir.iterdir()}
    assert len(survivors) == 2 and not (crashed_dir / "meta.json").exists(), "two finished shards, no meta, no tmp"
    monkeypatch.setattr(datamodules.shards, "encode_shard", real)
    time.sleep(0.01)
    resumed = prepared(tiny_tokenizer, [corpus], tmp_path / "crashed", num_proc=1)
    assert folder_bytes(resumed.token_dir) == folder_bytes(clean.token_dir)
    assert {n: (crashed_dir / n).stat().st_mtime_ns for n in survivors} == survivors, "finished shards not redone"
    # A lost shard and meta.json (a kill between renames) are redone the same way.
    (crashed_dir / "meta.json").unlink()
    (crashed_dir / "train-00001.bin").unlink()
    resumed_again = prepared(tiny_tokenizer, [corpus], tmp_path / "crashed", num_proc=2)
    assert folder_bytes(resumed_again.token_dir) == folder_bytes(clean.token_dir)


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path, corpus, tiny_tokenizer, monkeypatch):
    small = prepared(tiny_tokenizer, [corpus], tmp_path / "small", val_fraction=0.0)
    small_meta = json.loads((small.token_dir / "meta.json").read_text())
    monkeypatch.setattr(type(tiny_tokenizer), "__len__", lambda self: 70_000)
    large = prepared(tiny_tokenizer, [corpus], tmp_path / "large", val_fraction=0.0)
    large_meta = json.loads((large.token_dir / "meta.json").read_text())
    assert (small_meta["dtype"], large_meta["dtype"]) == ("uint16", "uint32")
    assert large_meta["tokens"] == small_meta["tokens"]
    assert sum(p.stat().st_size for p in large.token_dir.glob("*.bin")) == 4 * large_meta["tokens"]["train"]
    assert decoded_docs(large, "train") == DOCS


BAD_INPUT = [  # file, its lines (line 2 or 3 bad), the error, the skip reason, the good documents
    ("c.txt", [b"good", b"bad \xc3\x28 bytes", b"good"], r"c\.txt:2: not valid UTF-8", "unreadable lines", 2),
    (
        "c.jsonl",
        [b'{"text": "good"}', b'{"text": "good"', b'{"text": "good"}'],
        r"c\.jsonl:2: malformed JSON",
        "unreadable lines",
        2,
    ),
    (
        "c.jsonl",
        [b'{"text": "good"}', b'{"body": "x"}', b'{"text": "good"}'],
        r"c\.jsonl:2: field 'text': missing or empty",
        "bad records",
        2,
    ),
    (
        "c.jsonl",
        [b'{"text": "good"}', b'{"text": "  "}', b'{"text": "good"}'],
        r"c\.jsonl:2: field 'text': missing or empty",
        "bad records",
        2,
    ),
    (
        "c.csv",
        [b"text,id", b"good,1", b"bad,2,extra", b"good,3"],
        r"c\.csv:3: expected 2 columns",
        "unreadable lines",
        2,
    ),
    ("c.csv", [b"body,id", b"good,1"], r"c\.csv:2: field 'text': missing or empty", "bad records", 0),
]


@pytest.mark.parametrize(
    "name,lines,error,reason,good",
    BAD_INPUT,
    ids=["bad-utf8", "bad-json", "missing-field", "empty-document", "bad-csv-row", "csv-no-field"],
)
def test_bad_input_is_named_or_counted_in_meta(tmp_path, tiny_tokenizer, name, lines, error, reason, good):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=error):
        prepared(tiny_tokenizer, [path], tmp_path / "cache", val_fraction=0.0)
    dm = prepared(tiny_tokenizer, [path], tmp_path / "cache", val_fraction=0.0, on_error="skip")
    meta = json.loads((dm.token_dir / "meta.json").read_text())
    assert meta["skipped"] == {reason: 1} and re.search(error, meta["skip_examples"][0])
    assert meta["documents"]["train"] == good and decoded_docs(dm, "train") == ["good"] * good
    reused = prepared(tiny_tokenizer, [path], tmp_path / "cache", val_fraction=0.0, on_error="skip")
    assert reused.skips.skipped == meta["skipped"], "a cache hit reports the skips of the run that made it"


def test_a_very_long_line_is_tokenized_in_pieces_with_bounded_memory(tmp_path, tiny_tokenizer):
    """The 50 MB line case, at 3 MB so the test stays quick; same code path (many pieces of chunk_chars)."""
    long_doc = ("三加四等于七，the cat sat on the mat. " * 120_000)[:1_000_000]
    path = tmp_path / "long.txt"
    path.write_text(f"short one\n{long_doc}\nshort two\n")
    dm = prepared(tiny_tokenizer, [path], tmp_path / "cache", val_fraction=0.0, chunk_chars=20_000, num_proc=1)
    assert decoded_docs(dm, "train") == ["short one", long_doc, "short two"]


def test_shards_hold_one_source_each_and_windows_do_not_depend_on_the_cut(tmp_path, corpus, tiny_tokenizer):
    second = tmp_path / "second.txt"
    second.write_text("\n".join(reversed(DOCS)) + "\n")
    small = prepared(tiny_tokenizer, [corpus, second], tmp_path / "small", val_fraction=0.2)
    meta = json.loads((small.token_dir / "meta.json").read_text())
    assert {s["source"] for s in meta["shards"]} == {"corpus", "second"}
    for name, counts in meta["by_source"].items():
        rows = [s for s in meta["shards"] if s["source"] == name]
        assert counts["tokens"] == {
            split: sum(s["tokens"] for s in rows if s["split"] == split) for split in ("train", "val")
        }
    one_shard = prepared(tiny_tokenizer, [corpus, second], tmp_path / "large", val_fraction=0.2, shard_mb=8)
    assert len(json.loads((one_shard.token_dir / "meta.json").read_text())["shards"]) == 4, "cut only at the source"
    small.setup()
    one_shard.setup()
    assert [w["input_ids"].tolist() for w in small.train_set] == [w["input_ids"].tolist() for w in one_shard.train_set]


MAIN_SCRIPT = """
import os, sys
with open(sys.argv[1], "a") as f:  # every process that runs this file
    f.write(f"{os.getpid()}\\n")
if __name__ == "__main__":
    from pathlib import Path
    import numpy as np
    from tokenizers import Tokenizer
    from datamodules.shards import ShardWriter, make_encoder, plan_shards
    docs = [("train", "corpus", f"document {i}: the cat sat on the mat.") for i in range(40)]
    writer = ShardWriter(Path(sys.argv[3]), make_encoder(Tokenizer.from_file(sys.argv[2]), "tokenizers"), 0,
                         np.dtype(np.uint16), num_proc=2, chunk_chars=1000)
    rows = writer.write(plan_shards(docs, 100), total_bytes=1)
    print(sum(row["tokens"] for row in rows))
"""


def test_tokenizing_workers_do_not_run_the_parents_main_script(tmp_path, tiny_tokenizer):
    """A spawned worker imports the parent's main script unless told not to: train.py's imports cost each worker
    about 10 s of CPU. The workers here tokenize without running it (only the parent writes its line)."""
    script, marker = tmp_path / "main.py", tmp_path / "imports.txt"
    script.write_text(MAIN_SCRIPT)
    tiny_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    done = subprocess.run(
        [sys.executable, str(script), str(marker), str(tmp_path / "tokenizer.json"), str(tmp_path / "shards")],
        cwd=Path(datamodules.shards.__file__).parents[1],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(datamodules.shards.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
            ),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 40 and len(list((tmp_path / "shards").glob("train-*.bin"))) > 2
    assert len(marker.read_text().split()) == 1, "a worker ran the main script"
