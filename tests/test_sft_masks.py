"""The -100 mask sits exactly on prompt and padding tokens; the response EOS is a label."""

from __future__ import annotations

import torch
from conftest import expected, template

from datamodules.collate import IGNORE_INDEX, CausalCollator
from datamodules.formats import to_messages
from datamodules.sft import tokenize_conversation


def test_alpaca_mask_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = template("alpaca")
    record = {"instruction": "Add the two numbers.", "input": "3 + 4", "output": "7"}
    sample = tokenize_conversation(tok, to_messages(record, "x.jsonl", 1), max_length=512)
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd the two numbers.\n\n### Input:\n3 + 4\n\n### Response:\n"
    )
    ids, labels = expected(tok, [(prompt, False), ("7" + tok.eos_token, True)])
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert sample["labels"][-1].item() == tok.eos_token_id  # the model learns to stop
    assert (sample["labels"] != IGNORE_INDEX).sum().item() == len(tok.encode("7", add_special_tokens=False)) + 1


def test_alpaca_without_input_has_no_input_section(tiny_tokenizer):
    tiny_tokenizer.chat_template = template("alpaca")
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    sample = tokenize_conversation(tiny_tokenizer, to_messages(record, "x.jsonl", 1), max_length=512)
    assert "### Input" not in tiny_tokenizer.decode(sample["input_ids"])


def test_two_turn_chat_labels_every_assistant_turn_only(tiny_tokenizer):
    tok = tiny_tokenizer  # chatml template
    record = {"conversations": [
        {"from": "human", "value": "What is 3 plus 4?"}, {"from": "gpt", "value": "7."},
        {"from": "human", "value": "And times 2?"}, {"from": "gpt", "value": "14."},
    ]}
    sample = tokenize_conversation(tok, to_messages(record, "x.jsonl", 1), max_length=512)
    eos = tok.eos_token
    ids, labels = expected(tok, [
        ("<|user|>\nWhat is 3 plus 4?\n<|assistant|>\n", False), ("7." + eos, True),
        ("<|user|>\nAnd times 2?\n<|assistant|>\n", False), ("14." + eos, True),
    ])
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert sample["labels"].tolist().count(tok.eos_token_id) == 2  # both turns end with a labelled EOS
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(to_messages(record, "x", 1), tokenize=False)


def test_train_on_prompt_labels_everything(tiny_tokenizer):
    record = {"prompt": "hello", "response": "world"}
    sample = tokenize_conversation(tiny_tokenizer, to_messages(record, "x", 1), 512, train_on_prompt=True)
    assert sample["labels"].tolist() == sample["input_ids"].tolist()


def test_babyllama_template_segments(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = template("babyllama")
    messages = [{"role": "system", "content": "资料"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}]
    sample = tokenize_conversation(tok, messages, 512)
    ids, labels = expected(tok, [("资料：资料\n人类：你好\n助手：", False), ("你好！" + tok.eos_token, True)])
    assert (sample["input_ids"].tolist(), sample["labels"].tolist()) == (ids, labels)


def test_collator_pads_with_pad_id_and_minus_100_then_shifts():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, -100, 7, 8])},
        {"input_ids": torch.tensor([9, 10]), "labels": torch.tensor([-100, 10])},
    ]
    batch = CausalCollator(pad_id=0, pad_to_multiple_of=4)(samples)
    # longest 4 -> model width 3 rounded up to 4 -> padded to 5 before the shift
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
