"""lmlab/core/collate.py's one padding: right and left, and the batches built on it (classification, generation)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from datamodules.classification import ClassificationCollator
from lmlab.core.collate import pad, padding_mask
from lmlab.infer.generation import encode_prompts

ROWS = [torch.tensor([5, 6, 7]), [8], torch.tensor([], dtype=torch.long), torch.tensor([1, 2, 3, 4], dtype=torch.int32)]


def test_pad_right_and_left():
    assert pad(ROWS, 0, 5).tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [0] * 5, [1, 2, 3, 4, 0]]
    left = pad(ROWS, -1, 5, side="left")
    assert left.tolist() == [[-1, -1, 5, 6, 7], [-1, -1, -1, -1, 8], [-1] * 5, [-1, 1, 2, 3, 4]]
    assert left.dtype == pad(ROWS, 0, 5).dtype == torch.long  # int32 and list rows alike become long
    assert padding_mask(ROWS, 5, side="left").tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0] * 5, [0, 1, 1, 1, 1]]
    assert padding_mask(ROWS, 5).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [1, 1, 1, 1, 0]]
    assert padding_mask(ROWS, 4).dtype == torch.long


def test_pad_refuses_an_unknown_side():
    with pytest.raises(ValueError, match="pad side must be 'left' or 'right', got 'top'"):
        pad(ROWS, 0, 5, side="top")


@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_batch_pads_on_its_side(side):
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "label": 1}, {"input_ids": torch.tensor([8]), "label": 0}]
    batch = ClassificationCollator(pad_id=0, padding_side=side, pad_to_multiple_of=4)(samples)
    ids, mask = ([[0, 5, 6, 7], [0, 0, 0, 8]], [[0, 1, 1, 1], [0, 0, 0, 1]])
    if side == "right":
        ids, mask = ([[5, 6, 7, 0], [8, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert batch["input_ids"].tolist() == ids and batch["attention_mask"].tolist() == mask
    assert batch["labels"].tolist() == [1, 0]
    assert {v.dtype for v in batch.values()} == {torch.long}


def test_classification_collator_names_the_setting_of_a_bad_side():
    with pytest.raises(ValueError, match=r"data\.padding_side must be 'left' or 'right', got 'middle'"):
        ClassificationCollator(pad_id=0, padding_side="middle")


def test_causal_prompts_are_the_tokenizers_left_padded_batch(tiny_tokenizer):
    prompts = ["a", "What is 5 plus 6? It is 11.", "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "Add."]
    causal = SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=False))
    for batch_prompts in (prompts, prompts[:1], prompts[2:]):
        batch = encode_prompts(causal, tiny_tokenizer, batch_prompts)
        expected = tiny_tokenizer(
            batch_prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        assert set(batch) == set(expected) == {"input_ids", "attention_mask"}
        for key in batch:
            assert batch[key].dtype == expected[key].dtype
            assert torch.equal(batch[key], expected[key]), key
    assert len({len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}) == 4  # it pads
