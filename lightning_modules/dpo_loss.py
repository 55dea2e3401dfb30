"""Pure tensor functions for DPO-style preference training, following TRL's DPOTrainer formulas.

Chosen and rejected answers run as one concatenated batch: the first half of the rows is chosen, the second half
rejected. Per-token values [N, T] are aligned with labels [N, T] (next-token targets, -100 on prompt and padding).
A packed batch (one row of samples end to end) passes ``documents`` (lmlab.core.collate.packed_documents): its
samples are then what the per-row functions reduce over, the first half of them chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.core.collate import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def per_sample_sums(values: torch.Tensor, documents: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Sums of ``values`` [N, T] per row, shape [N]; with ``documents`` per sample of a packed row."""
    if documents is None:
        return values.sum(-1)
    index, n = documents
    return values.new_zeros(n + 1).index_add_(0, index.flatten(), values.flatten())[:n]  # slot n: the padding tail


def label_counts(labels: torch.Tensor, documents: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Number of label (non -100) positions per row (per sample with ``documents``), shape [N]."""
    return per_sample_sums(labels.ne(IGNORE_INDEX).long(), documents)


def sequence_logps(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    average: bool = False,
    documents: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Per-row (per-sample with ``documents``) sum (or mean) of the per-token log p(label) [N, T] (0 off the labels:
    lmlab.core.losses.label_logps or head_label_logps), shape [N].

    A row without label positions sums to 0 and averages to 0. None reaches a training step: the preference
    datamodule drops a pair with no answer token (counted in its skips). Averaging does not check for one, which
    would wait for the GPU at every step (IPO's step had such a host sync).
    """
    if token_logps.shape != labels.shape:
        raise ValueError(
            f"token log-probs {tuple(token_logps.shape)} must have the labels' shape {tuple(labels.shape)}"
        )
    logps = per_sample_sums(token_logps, documents)
    if not average:
        return logps
    return logps / label_counts(labels, documents).clamp(min=1)


def masked_mean_logits(logit_sums: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean logit over the whole vocabulary at label positions (TRL's logits/chosen, logits/rejected), a scalar, from
    each position's logits summed over the vocabulary [N, T] (float32: no float copy of the logits is made).

    Detached: it is a logged metric. NaN when there are no label positions, like an empty mean.
    """
    mask = labels.ne(IGNORE_INDEX)  # a where, not an index by the mask: that would wait for the GPU to count it
    return torch.where(mask, logit_sums.detach(), 0.0).sum() / (mask.sum() * vocab_size)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards of chosen and rejected answers [B] each.

    All inputs are per-sequence log-probs [B]. "sigmoid" is DPO (with label_smoothing > 0, conservative DPO);
    "ipo" expects per-token *averaged* log-probs (sequence_logps(..., average=True)) as TRL feeds it;
    "hinge" is SLiC. Rewards are detached: they are for logging, not for the gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for loss_type='sigmoid', not {loss_type!r}")

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)

    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_logits_mean: torch.Tensor,
    rejected_logits_mean: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch means under TRL's metric names, so curves compare directly with TRL runs."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
        "logits/chosen": chosen_logits_mean.detach(),
        "logits/rejected": rejected_logits_mean.detach(),
    }


def rpo_nll(chosen_logps_sum: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """RPO's SFT term: mean over pairs of the chosen answers' per-token negative log-likelihood, a scalar.

    Counts must be positive (see label_counts); per-token normalisation keeps long answers from dominating.
    """
    return (-chosen_logps_sum / chosen_token_counts).mean()
