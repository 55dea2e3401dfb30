"""Preference (DPO) data: every record shape, named errors, exact label masks, and the 2B-row batch."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SHARED_DATA, connect, expected

from datamodules.formats import DataError, to_preference
from datamodules.preference import PreferenceDataModule, tokenize_preference
from lmlab.core.collate import IGNORE_INDEX, CausalCollator, PreferenceCollator, Seq2SeqCollator

USER = [{"role": "user", "content": "What is 3 plus 4?"}]
GOOD = {"prompt": "What is 3 plus 4?", "chosen": "7.", "rejected": "It is 11."}


def write_jsonl(path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))


def module(tok, path, arch="causal", max_length=512, batch_size=8, pad_to_multiple_of=1, **kwargs):
    """A PreferenceDataModule over ``path`` (train and val), connected; ``kwargs`` are data fields."""
    dm = PreferenceDataModule(train_files=[str(path)], val_files=[str(path)], **kwargs)
    return connect(
        dm, tok, arch=arch, max_length=max_length, batch_size=batch_size, pad_to_multiple_of=pad_to_multiple_of
    )


# --- record shapes ------------------------------------------------------------------------------------------


def test_prompt_chosen_rejected():
    assert to_preference(GOOD, "f", 1) == [(USER, "7.", "It is 11.")]


def test_alpaca_with_input_and_an_ignored_output():
    record = {"instruction": "Add the two numbers.", "input": "3 + 4", "output": "7", "chosen": "7", "rejected": "34"}
    assert to_preference(record, "f", 1) == [
        ([{"role": "user", "content": "Add the two numbers.", "input": "3 + 4"}], "7", "34")
    ]
    no_input = {"instruction": "Say hi.", "input": "", "chosen": "hi", "rejected": "no"}
    assert to_preference(no_input, "f", 1)[0][0] == [{"role": "user", "content": "Say hi."}]


def test_history_becomes_prompt_turns():
    record = {
        "instruction": "再说一遍",
        "input": "",
        "history": [["你好", "你好！"]],
        "chosen": "你好！",
        "rejected": "不",
    }
    prompt, chosen, rejected = to_preference(record, "f", 1)[0]
    assert prompt == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "再说一遍"},
    ]
    assert (chosen, rejected) == ("你好！", "不")


def test_conversations_with_from_value_and_the_generator_layout():
    record = {
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
        ],
        "chosen": "good",
        "rejected": "bad",
    }
    assert to_preference(record, "f", 1) == [
        (
            [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
            ],
            "good",
            "bad",
        )
    ]
    generated = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
        "chosen": "good",
        "rejected": "bad",
        "model": "tiny",
        "temperature": 0.7,
    }
    assert to_preference(generated, "f", 1) == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "good", "bad")
    ]


def test_ranked_outputs_give_best_against_every_other_answer():
    record = {
        "instruction": "再说一遍",
        "input": "",
        "history": [["你好", "你好！"]],
        "output": ["最好的", "次好的", "", "最差的"],
    }
    pairs = to_preference(record, "f", 1)
    assert [(c, r) for _, c, r in pairs] == [("最好的", "次好的"), ("最好的", "最差的")]  # n-1 non-empty others
    assert all(p == pairs[0][0] for p, _, _ in pairs) and pairs[0][0][-1] == {"role": "user", "content": "再说一遍"}
    assert len(to_preference({"instruction": "x", "output": ["a", "b", "c"]}, "f", 1)) == 2


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing or empty"),
        ({"prompt": "q", "chosen": " ", "rejected": "b"}, "chosen", "missing or empty"),
        ({"instruction": "x", "output": "y"}, "chosen", "missing or empty"),
        ({"instruction": "x", "output": ["only one", ""]}, "output", "at least 2 non-empty answers"),
        ({"instruction": "x", "output": ["", "a", "b"]}, "output[0]", "missing or empty"),
        ({"instruction": "x", "output": ["a", " a "]}, "output[1]", "identical"),
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "b",
                "rejected": "c",
            },
            "messages",
            "end with a user turn",
        ),
        (
            {"conversations": [{"from": "robot", "value": "q"}], "chosen": "b", "rejected": "c"},
            "conversations[0].role",
            "unknown role",
        ),
    ],
)
def test_bad_records_name_the_field(record, field, message):
    with pytest.raises(DataError, match=rf"f:7: field '{re.escape(field)}':.*{message}"):
        to_preference(record, "f", 7)


def test_answers_given_as_assistant_turns():
    """LLaMA-Factory's dpo_zh_demo: chosen and rejected are {from, value} turn objects."""
    record = {
        "conversations": [{"from": "system", "value": "简短回答。"}, {"from": "human", "value": "三加四？"}],
        "chosen": {"from": "gpt", "value": "七。"},
        "rejected": {"role": "assistant", "content": "八。"},
    }
    assert to_preference(record, "f", 1) == [
        ([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "三加四？"}], "七。", "八。")
    ]
    with pytest.raises(DataError, match=r"f:4: field 'rejected.role': expected an assistant turn, got role 'human'"):
        to_preference({**record, "rejected": {"from": "human", "value": "八。"}}, "f", 4)
    with pytest.raises(DataError, match=r"f:5: field 'chosen.content': missing or empty"):
        to_preference({**record, "chosen": {"from": "gpt", "value": " "}}, "f", 5)


def test_identical_pair_and_unknown_shape():
    with pytest.raises(DataError, match="f:2: chosen and rejected are identical"):
        to_preference({"prompt": "q", "chosen": "same ", "rejected": " same"}, "f", 2)
    with pytest.raises(DataError, match=r"cannot tell the record's shape from its fields \['answer', 'question'\]"):
        to_preference({"question": "q", "answer": "a"}, "f", 2)


# --- bad records through the datamodule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing or empty"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
        ({"instruction": "x", "input": "", "output": ["only one"]}, "field 'output': a ranked list needs at least 2"),
    ],
)
@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_bad_record_names_file_line_and_field(tmp_path, tiny_tokenizer, bad, message, arch):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD, GOOD, bad, GOOD])
    dm = module(tiny_tokenizer, path, arch=arch)
    with pytest.raises(DataError) as err:
        dm.setup()
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    assert err.value.line == 3


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_skip_counts_bad_records_and_keeps_the_rest(tmp_path, tiny_tokenizer, arch):
    path = tmp_path / "train.jsonl"
    write_jsonl(
        path,
        [
            GOOD,
            {"prompt": "q", "chosen": "a"},
            "{not json",
            GOOD,
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"instruction": "x", "output": ["one"]},
            {"instruction": "x", "output": ["best", "mid", "worst"]},
        ],
    )
    dm = module(tiny_tokenizer, path, on_error="skip", arch=arch)
    dm.setup()
    assert len(dm.train_set) == 4  # 2 single pairs + 2 from the ranked record
    # counted twice: the train and the val file are the same file here
    assert dm.skips.skipped == {"bad records": 6, "unreadable lines": 2}


def test_pair_with_an_answer_truncated_away_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    long_prompt = {"prompt": "What is 5 plus 6? " * 20, "chosen": "11", "rejected": "12"}
    write_jsonl(path, [GOOD, long_prompt, GOOD])
    dm = module(tiny_tokenizer, path, max_length=24)
    dm.setup()
    assert len(dm.train_set) == 2
    assert dm.skips.skipped == {"samples with no answer token left after truncation to 24": 2}


# --- token layouts --------------------------------------------------------------------------------------------


@pytest.fixture(params=["byte", "char"])
def tok(request, tiny_tokenizer, tiny_char_tokenizer):
    """Both tokenizer levels, chatml template: ids are the whole rendering's, labels only on the answer."""
    return tiny_tokenizer if request.param == "byte" else tiny_char_tokenizer


def test_causal_masks_token_by_token(tok):
    item = tokenize_preference(tok, USER, "7.", "It is 11.", max_length=512, max_target_length=512, arch="causal")
    for side, answer in (("chosen", "7."), ("rejected", "It is 11.")):
        ids, labels = expected(
            tok, [("<|user|>\nWhat is 3 plus 4?\n<|assistant|>\n", False), (answer + tok.eos_token, True)]
        )
        assert item[side]["input_ids"].tolist() == ids
        assert item[side]["labels"].tolist() == labels
        assert item[side]["labels"][-1].item() == tok.eos_token_id


def test_causal_history_replies_are_not_labels(tok):
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "3+4?"},
    ]
    item = tokenize_preference(tok, prompt, "7", "8", 512, 512, "causal")
    ids, labels = expected(
        tok,
        [
            ("<|user|>\nhi\n<|assistant|>\n", False),
            ("hello" + tok.eos_token, False),
            ("<|user|>\n3+4?\n<|assistant|>\n", False),
            ("7" + tok.eos_token, True),
        ],
    )
    assert (item["chosen"]["input_ids"].tolist(), item["chosen"]["labels"].tolist()) == (ids, labels)


def test_seq2seq_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    item = tokenize_preference(tok, USER, "7.", "It is 11.", 512, 512, "seq2seq")
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    for side, answer in (("chosen", "7."), ("rejected", "It is 11.")):
        assert item[side]["input_ids"].tolist() == tok.encode(prompt, add_special_tokens=False) + [tok.eos_token_id]
        assert item[side]["labels"].tolist() == tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]


# --- batches --------------------------------------------------------------------------------------------------


def test_causal_batch_is_chosen_then_rejected(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    write_jsonl(
        path,
        [
            GOOD,
            {"prompt": "Add 5 and 6.", "chosen": "11", "rejected": "It is 56, I think."},
            {"instruction": "x", "output": ["best", "mid", "worst"]},
        ],
    )
    dm = module(tiny_tokenizer, path, batch_size=3, pad_to_multiple_of=8)
    dm.setup()
    assert isinstance(dm.collator(), PreferenceCollator)
    batch = next(iter(dm.val_dataloader()))
    items = [dm.val_set[i] for i in range(3)]
    reference = CausalCollator(tiny_tokenizer.pad_token_id, 8)(
        [i["chosen"] for i in items] + [i["rejected"] for i in items]
    )
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] % 8 == 0
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], reference[key])
    # shifted: row 0 is the first chosen sample's next-token targets
    n = len(items[0]["chosen"]["labels"])
    assert batch["labels"][0, : n - 1].tolist() == items[0]["chosen"]["labels"][1:].tolist()
    assert (
        batch["labels"][3, : len(items[0]["rejected"]["labels"]) - 1].tolist()
        == items[0]["rejected"]["labels"][1:].tolist()
    )


def test_seq2seq_batch_shares_encoder_rows():
    item = {
        "chosen": {"input_ids": torch.tensor([5, 6, 1]), "labels": torch.tensor([7, 1])},
        "rejected": {"input_ids": torch.tensor([5, 6, 1]), "labels": torch.tensor([8, 9, 1])},
    }
    batch = PreferenceCollator(Seq2SeqCollator(pad_id=0))([item, item])
    assert batch["input_ids"].tolist() == [[5, 6, 1]] * 4
    assert batch["labels"].tolist() == [[7, 1, -100], [7, 1, -100], [8, 9, 1], [8, 9, 1]]


def test_sample_pairs_and_iter_texts(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD, {"instruction": "Add.", "input": "1 + 2", "output": ["3", "12"]}])
    dm = module(tiny_tokenizer, path)
    dm.setup()
    assert dm.sample_pairs(1) == [("<|user|>\nWhat is 3 plus 4?\n<|assistant|>\n", "7.")]
    assert list(dm.iter_texts()) == ["What is 3 plus 4?", "7.", "It is 11.", "Add.\n1 + 2", "3", "12"]


# --- the shared preference sets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath, n_records, bad",
    [
        ("dpo_en_preference/instruction-data-with-preference.json", 1100, 6),  # 6 pairs with chosen == rejected
        ("zh_dpo_preference/dpo_zh_500.jsonl", 500, 0),
        ("zh_oasst_rm_preference/oaast_rm_zh.json", 775, 3),  # 3 ranked lists repeat the best answer
    ],
)
@pytest.mark.slow
def test_shared_preference_sets_load_with_a_first_batch(tiny_tokenizer, relpath, n_records, bad):
    path = SHARED_DATA / relpath
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    dm = PreferenceDataModule(train_files=[str(path)], val_fraction=0.05, max_target_length=128, on_error="skip")
    connect(dm, tiny_tokenizer, max_length=256, batch_size=4)
    dm.setup()
    assert dm.skips.skipped.get("bad records", 0) == bad
    train, val = dm.split()
    assert len(train) + len(val) == n_records - bad
    assert len(dm.train_set) + len(dm.val_set) + dm.skips.total - bad == sum(len(p) for p in dm.examples())
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert (batch["labels"][:4] != IGNORE_INDEX).any(dim=1).all() and (batch["labels"][4:] != IGNORE_INDEX).any(
        dim=1
    ).all()


def test_rows_written_by_the_rejected_generator_keep_the_alpaca_input():
    record = {
        "messages": [{"role": "user", "content": "计算两个数的和。", "input": "六加九"}],
        "chosen": "十五",
        "rejected": "十六",
        "source": "x.jsonl",
        "line": 3,
    }
    ((prompt, chosen, rejected),) = to_preference(record, "rej.jsonl", 1)
    assert prompt == [{"role": "user", "content": "计算两个数的和。", "input": "六加九"}]
    assert (chosen, rejected) == ("十五", "十六")
