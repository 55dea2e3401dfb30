"""Token statistics over lmlab's label layout (lmlab.core.collate: -100 marks a position that is not a target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.core.collate import IGNORE_INDEX


def label_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, correct argmax predictions, label tokens) over the positions whose label is not -100.

    Sums, so a caller weighs batches by their label tokens (validation in lightning_modules/lm.py, eval.py's
    ppl/sft tasks); tensors, so a training loop needs no host sync. ``logits`` align with ``labels`` (causal
    labels come pre-shifted from the collator).
    """
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return (nll, *label_hits(logits, labels))


def label_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct argmax predictions, label tokens) over the positions whose label is not -100: the accuracy alone,
    without the fp32 cross entropy (training logs it while its loss comes from the model)."""
    mask = labels != IGNORE_INDEX
    return ((logits.argmax(-1) == labels) & mask).sum(), mask.sum()
