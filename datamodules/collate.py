"""Batching: pad to the batch's longest sample, then shift so labels are next-token targets."""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


class CausalCollator:
    """Pads ``input_ids`` with ``pad_id`` and ``labels`` with -100, then shifts by one.

    Samples hold aligned ``input_ids``/``labels`` (the Hugging Face convention, which the
    mask tests read). The batch holds ``input_ids[:, :-1]`` and ``labels[:, 1:]``, so a
    pretraining window of seq_len+1 tokens feeds exactly seq_len positions to the model and
    the loss needs no further shifting. The padded length minus one is rounded up to
    ``pad_to_multiple_of`` (8 or 64 suits tensor cores; 1 disables it).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        width = math.ceil((longest - 1) / self.multiple) * self.multiple + 1
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n] = s["input_ids"]
            labels[row, :n] = s["labels"]
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids[:, :-1].contiguous(),
            "attention_mask": attention_mask[:, :-1].contiguous(),
            "labels": labels[:, 1:].contiguous(),
        }
