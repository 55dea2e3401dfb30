"""Bad input: a clear error naming file, line and field, or a count under data.on_error=skip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_cfg, connect

from datamodules.formats import DataError, read_records
from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule
from lightning_modules.base import NonFiniteLossError
from train import train

GOOD = {"instruction": "Add.", "input": "1 + 2", "output": "3"}


def sft_module(tiny_tokenizer, train_file, arch="causal", max_length=512, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(train_files=[str(train_file)], val_files=[str(train_file)], **kwargs)
    return connect(dm, tiny_tokenizer, arch=arch, max_length=max_length)


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def good_line() -> bytes:
    return json.dumps(GOOD).encode()


@pytest.mark.parametrize(
    "bad, message",
    [
        (b'{"instruction": "Add.", "output": "3"', "malformed JSON"),
        (json.dumps({"instruction": "Add.", "input": ""}).encode(), "field 'output': missing or empty"),
        (json.dumps({"instruction": "  ", "output": "3"}).encode(), "field 'instruction': missing or empty"),
        (b'{"instruction": "Add \xff", "output": "3"}', "not valid UTF-8"),
        (json.dumps({"question": "?", "answer": "!"}).encode(), "cannot tell the record's shape"),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}).encode(),
            "field 'messages[1].role': unknown role",
        ),
    ],
)
@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_bad_sft_record_names_file_line_and_field(tmp_path, tiny_tokenizer, bad, message, arch):
    path = tmp_path / "train.jsonl"
    write_lines(path, [good_line(), good_line(), bad, good_line()])
    dm = sft_module(tiny_tokenizer, path, arch=arch)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)
    assert err.value.line == 3


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_skip_counts_every_bad_record_and_keeps_the_rest(tmp_path, tiny_tokenizer, arch):
    path = tmp_path / "train.jsonl"
    write_lines(path, [good_line(), b"{not json", good_line(), b'{"instruction": "x"}', b"\xff\xfe", good_line()])
    dm = sft_module(tiny_tokenizer, path, on_error="skip", arch=arch)
    dm.setup()
    assert len(dm.train_set) == 3
    # each bad line is counted twice: once in the train and once in the val file (the same file here)
    assert dm.skips.skipped == {"unreadable lines": 4, "bad records": 2}
    assert "skipped 6 records" in dm.skips.report()


def test_unknown_format_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"data\.xml: unknown format '\.xml'"):
        list(read_records(path))
    with pytest.raises(DataError, match="unknown format 'yaml'"):
        list(read_records(tmp_path / "data.xml", fmt="yaml"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        list(read_records(tmp_path / "nope.jsonl"))


def test_csv_wrong_column_count_names_the_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nhello\tham\nbroken line\n")
    with pytest.raises(DataError, match=r"d\.tsv:3: expected 2 columns"):
        list(read_records(path))


def test_pretrain_text_with_bad_bytes_names_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    write_lines(path, [b"good line one", b"good line two", b"bad \xc3\x28 bytes"])
    dm = PretrainDataModule(train_files=[str(path)], cache_dir=str(tmp_path / "cache"))
    connect(dm, tiny_tokenizer, max_length=4)
    with pytest.raises(DataError, match=r"corpus\.txt:3: not valid UTF-8"):
        dm.prepare_data()
    dm_skip = PretrainDataModule(
        train_files=[str(path)], cache_dir=str(tmp_path / "cache"), on_error="skip", val_fraction=0.0
    )
    connect(dm_skip, tiny_tokenizer, max_length=4)
    dm_skip.prepare_data()
    assert dm_skip.skips.skipped == {"unreadable lines": 1}


def test_sample_with_no_response_left_after_truncation_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    long_prompt = {"prompt": "word " * 200, "response": "short"}
    write_lines(path, [good_line(), json.dumps(long_prompt).encode(), good_line()])
    dm = sft_module(tiny_tokenizer, path, max_length=64)
    dm.setup()
    assert len(dm.train_set) == 2
    assert all((s["labels"] != -100).any() for s in dm.train_set.samples)
    assert dm.skips.skipped == {"samples with no answer token left after truncation to 64": 2}


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from lightning_modules import lm

    real_forward = lm.LMModule._forward

    def poisoned(self, batch, with_loss):
        out = real_forward(self, batch, with_loss)
        if with_loss and self.global_step >= 7:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(lm.LMModule, "_forward", poisoned)
    cfg = compose_cfg(tmp_path, ["max_steps=20", "checkpoint_every=5", "callbacks.samples.num_prompts=0"])
    with pytest.raises(NonFiniteLossError, match=r"loss is not finite \(nan/inf\) at step 7"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_class_without_training_examples_is_named_in_a_warning(tmp_path, caplog):
    from datamodules.classification import ClassificationDataModule

    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    write_lines(train, [json.dumps({"text": t, "label": c}).encode() for t, c in (("hi", "ham"), ("win", "spam"))])
    write_lines(held, [json.dumps({"text": "eggs?", "label": "eggs"}).encode()])
    dm = ClassificationDataModule(
        train_files=[str(train)], labels=["ham", "spam", "eggs"], val_files=[str(held)], test_files=[str(held)]
    )
    with caplog.at_level("WARNING"):
        dm.splits()
    assert "class 'eggs' has no training examples (val 1, test 1)" in caplog.text


def test_a_hub_repo_id_still_goes_to_transformers(monkeypatch):
    """Only local paths are checked: a name that is no local path but may be a Hub repo id is transformers' to load."""
    from lmlab.core import tokenizer as tokenizer_module

    asked = []

    def from_pretrained(name):
        asked.append(name)
        raise OSError("offline")

    monkeypatch.setattr(tokenizer_module.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match=r"tokenizer=some-org/some-tokenizer: no local folder .* Hub failed \(offline\)"):
        tokenizer_module.load_tokenizer("some-org/some-tokenizer")
    assert asked == ["some-org/some-tokenizer"]
    with pytest.raises(FileNotFoundError, match="tokenizer path /nonexistent does not exist"):
        tokenizer_module.load_tokenizer("/nonexistent")
    assert asked == ["some-org/some-tokenizer"]


def test_ignored_fields_are_kept_in_the_token_cache_and_reported_on_reuse(tmp_path, tiny_tokenizer):
    path = tmp_path / "news.jsonl"
    write_lines(path, [json.dumps({"text": f"news item {i} " * 8, "url": f"u{i}"}).encode() for i in range(20)])
    made, reused = (
        connect(
            PretrainDataModule(train_files=[str(path)], cache_dir=str(tmp_path / "cache")), tiny_tokenizer, max_length=8
        )
        for _ in range(2)
    )
    made.prepare_data()
    reused.prepare_data()
    assert json.loads((made.token_dir / "meta.json").read_text())["ignored_fields"] == {"url": 20}
    assert made.skips.ignored_fields == reused.skips.ignored_fields == {"url": 20}
    assert "ignored: url (20 records)" in reused.skips.report()
