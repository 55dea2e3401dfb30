"""Token statistics over lmlab's label layout (lmlab.core.collate: -100 marks a position that is not a target)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def label_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 2**26) -> torch.Tensor:
    """log p(label) [N, T] in float32 at the positions whose label is not -100, 0 at the others (which get no
    gradient either), differentiable: at the label positions the numbers of ``-F.cross_entropy(logits.float())``.

    That cross entropy makes an fp32 copy of the whole ``[N, T, V]`` logits and keeps its fp32 log-softmax for the
    backward: 2x the bf16 logits kept, 4x at the forward's peak, and a 2x fp32 gradient again in the backward (DPO
    at GPT-2's 50257-token vocabulary, 16 rows of 320: 0.5 GB of bf16 logits). Here the positions go through in
    chunks of about ``chunk_elements`` fp32 values; the backward keeps the logits themselves (1x, not copied when
    contiguous, as a model's output is) and one logsumexp per position, recomputes each chunk's softmax and
    writes the gradient in the logits' dtype. TRL's selective_log_softmax does the forward this way. Every position
    is computed, the -100 ones too, so nothing waits for the GPU to count them.
    """
    rows = max(1, chunk_elements // logits.shape[-1])
    logps = _LabelLogps.apply(logits.reshape(-1, logits.shape[-1]), labels.flatten().clamp(min=0), rows)
    return torch.where(labels != IGNORE_INDEX, logps.view(labels.shape), 0.0)


class _LabelLogps(torch.autograd.Function):
    """log p(target) of each row of ``logits`` [M, V], ``rows`` rows at a time (label_logps): logit - logsumexp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        lse = torch.cat([chunk.float().logsumexp(-1) for chunk in logits.split(rows)])
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """d logp / d logits = onehot(target) - softmax, scaled by each row's incoming gradient."""
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        chunks = (x.split(ctx.rows) for x in (logits, targets, lse, grad, grad_logits))
        for chunk, target, s, g, out in zip(*chunks, strict=True):
            rows = (chunk.float() - s[:, None]).exp_().mul_(-g[:, None])  # a new tensor: the logits stay as they are
            rows.scatter_add_(-1, target[:, None], g[:, None])
            out.copy_(rows)
        return grad_logits, None, None
