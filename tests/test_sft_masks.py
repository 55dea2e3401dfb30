"""The -100 mask sits exactly on prompt and padding tokens; the response EOS is a label; the ids are those of the
whole rendering, as inference encodes it, for byte- and char-level tokenizers alike."""

from __future__ import annotations

import pytest
import torch
from conftest import expected, template

from datamodules.formats import to_messages
from datamodules.sft import tokenize_conversation, tokenize_pair
from lmlab.core.collate import IGNORE_INDEX, CausalCollator


@pytest.fixture(params=["byte", "char"])
def tok(request, tiny_tokenizer, tiny_char_tokenizer):
    """Each test below runs with both tokenizer levels (chatml template unless the test sets another)."""
    return tiny_tokenizer if request.param == "byte" else tiny_char_tokenizer


def test_alpaca_mask_token_by_token(tok):
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
    assert (sample["labels"] != IGNORE_INDEX).sum().item() == 2  # "7" and EOS (no "▁" before the reply)


def test_alpaca_without_input_has_no_input_section(tok):
    tok.chat_template = template("alpaca")
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    sample = tokenize_conversation(tok, to_messages(record, "x.jsonl", 1), max_length=512)
    assert "### Input" not in tok.decode(sample["input_ids"])


def test_two_turn_chat_labels_every_assistant_turn_only(tok):
    record = {
        "conversations": [
            {"from": "human", "value": "What is 3 plus 4?"},
            {"from": "gpt", "value": "7."},
            {"from": "human", "value": "And plus 4?"},
            {"from": "gpt", "value": "11."},
        ]
    }
    sample = tokenize_conversation(tok, to_messages(record, "x.jsonl", 1), max_length=512)
    eos = tok.eos_token
    ids, labels = expected(
        tok,
        [
            ("<|user|>\nWhat is 3 plus 4?\n<|assistant|>\n", False),
            ("7." + eos, True),
            ("<|user|>\nAnd plus 4?\n<|assistant|>\n", False),
            ("11." + eos, True),
        ],
    )
    assert sample["input_ids"].tolist() == ids
    assert sample["labels"].tolist() == labels
    assert sample["labels"].tolist().count(tok.eos_token_id) == 2  # both turns end with a labelled EOS
    assert tok.decode(sample["input_ids"]) == tok.apply_chat_template(to_messages(record, "x", 1), tokenize=False)


def test_train_on_prompt_labels_everything(tok):
    record = {"prompt": "hello", "response": "world"}
    sample = tokenize_conversation(tok, to_messages(record, "x", 1), 512, train_on_prompt=True)
    assert sample["labels"].tolist() == sample["input_ids"].tolist()


def test_babyllama_template_segments(tok):
    tok.chat_template = template("babyllama")
    messages = [
        {"role": "system", "content": "资料"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
    ]
    sample = tokenize_conversation(tok, messages, 512)
    ids, labels = expected(tok, [("资料：资料\n人类：你好\n助手：", False), ("你好！" + tok.eos_token, True)])
    assert (sample["input_ids"].tolist(), sample["labels"].tolist()) == (ids, labels)


CHAT = [
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "It is 7."},
    {"role": "user", "content": "And 5 plus 6?"},
    {"role": "assistant", "content": "11, I think."},
]


def test_ids_are_the_whole_rendering_as_inference_encodes_it(tok):
    """Segments used to be encoded one by one: a char-level tokenizer then started each reply with "▁" ("▁It"),
    ids that inference, which encodes the rendered prompt as a whole, never produces."""
    sample = tokenize_conversation(tok, CHAT, max_length=512)
    whole = tok.encode(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)
    assert sample["input_ids"].tolist() == whole
    prompt = tok.encode(
        tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert whole[: len(prompt)] == prompt  # generation continues from exactly the ids training saw
    labelled = (sample["labels"] != IGNORE_INDEX).tolist()
    replies = [tok.convert_ids_to_tokens(whole[i]) for i in range(1, len(whole)) if labelled[i] and not labelled[i - 1]]
    assert len(replies) == 2 and not any(r.startswith(("▁", "Ġ")) for r in replies), replies


def test_a_token_straddling_prompt_and_response_belongs_to_the_side_it_starts_on(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = template("plain")  # no separator: the reply's text continues the prompt's word
    messages = [{"role": "user", "content": "Add t"}, {"role": "assistant", "content": "he two"}]
    sample = tokenize_conversation(tok, messages, max_length=512)
    tokens = tok.convert_ids_to_tokens(sample["input_ids"].tolist())
    assert tokens == ["Add", "Ġthe", "Ġtwo", tok.eos_token]  # "Ġthe" starts in the prompt, ends in the reply
    assert sample["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, *sample["input_ids"][2:].tolist()]


def test_seq2seq_target_is_the_reply_as_a_causal_model_sees_it(tok):
    """T5's labels are the reply's ids inside the conversation: no leading "▁" a char-level tokenizer would put
    in front of the reply encoded alone; they decode to the reply."""
    sample = tokenize_pair(tok, CHAT[:2], 512, 512)
    causal = tokenize_conversation(tok, CHAT[:2], 512)
    assert sample["labels"].tolist() == [i for i in causal["labels"].tolist() if i != IGNORE_INDEX]
    assert not tok.convert_ids_to_tokens(int(sample["labels"][0])).startswith("▁")
    assert tok.decode(sample["labels"]) == "It is 7." + tok.eos_token
    source = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert sample["input_ids"].tolist() == tok.encode(source, add_special_tokens=False) + [tok.eos_token_id]


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
