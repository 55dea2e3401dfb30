"""Token statistics over lmlab's label layout (lmlab.core.collate: -100 marks a position that is not a target)."""

from __future__ import annotations

import functools

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


def label_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = 2**26, compile: bool = False
) -> torch.Tensor:
    """log p(label) [N, T] in float32 at the positions whose label is not -100, 0 at the others (which get no
    gradient either), differentiable: at the label positions the numbers of ``-F.cross_entropy(logits.float())``.

    That cross entropy makes an fp32 copy of the whole ``[N, T, V]`` logits and keeps its fp32 log-softmax for the
    backward: 2x the bf16 logits kept, 4x at the forward's peak, and a 2x fp32 gradient again in the backward (DPO
    at GPT-2's 50257-token vocabulary, 16 rows of 320: 0.5 GB of bf16 logits). Here the positions go through in
    chunks of about ``chunk_elements`` fp32 values; the backward keeps the logits themselves (1x, not copied when
    their rows view flat, as a model's output does, from an aligned head too) and one logsumexp per position,
    recomputes each chunk's softmax and writes the gradient in the logits' dtype. TRL's selective_log_softmax does
    the forward this way. Every position is computed, the -100 ones too, so nothing waits for the GPU to count them.
    ``compile``: each chunk's element-wise work runs as one compiled kernel (torch.compile) that forms no fp32 copy.
    """
    rows = max(1, chunk_elements // logits.shape[-1])
    targets = labels.flatten().clamp(min=0)
    logps = _LabelLogps.apply(
        logits.reshape(-1, logits.shape[-1]), targets, rows, None, logits.shape[-1], compile, None
    )
    return torch.where(labels != IGNORE_INDEX, logps.view(labels.shape), 0.0)


def head_label_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    with_logit_sums: bool = False,
    chunk_elements: int = 2**26,
    compile: bool = False,
    multiple: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """label_logps of the logits ``hidden @ weight.T`` (an LM head without bias), without forming them: [N, T]
    float32, 0 off the labels; and with ``with_logit_sums`` each label position's logits summed over the vocabulary
    [N, T] (detached, 0 elsewhere: TRL's logits/chosen metric), else None.

    ``positions`` are the flat indices of the label positions in ``labels`` (lmlab.core.collate.PreferenceCollator
    counts them on the host, so nothing waits for the GPU here). Only their hidden states go through the head,
    ``chunk_elements`` logits at a time, and the backward recomputes each chunk's logits: what is kept is the
    selected hidden states, the head in the dtype it runs in (a copy, padded, unless the weight already is both)
    and one logsumexp per position, never a ``[rows, vocab]`` tensor.
    TRL's DPOTrainer does the same (``fused_lm_head``). Under autocast the head runs in its dtype, as a model's
    ``nn.Linear`` head would. With ``multiple`` (the run's ``align_lm_head``, which answer_logps reads off the
    model's head) the head's rows are padded with zeros to a multiple of it: at a vocabulary like GPT-2's 50257,
    rows of logits with an odd stride sent cuBLAS to slow unaligned kernels (on an H200, 4.8 of a 22 ms step).
    That copy, where one is needed, is made inside the autograd function, once; the head's gradient
    is summed over the chunks in one float32 tensor without a product per chunk where torch can (_add_product) and
    comes back in ``weight``'s own dtype. A cast and a pad as autograd ops made two copies of the head in the
    forward and two of its gradient (bf16, then fp32) in the backward. This runs outside a compiled model's CUDA
    graphs, in a memory pool of its own, so what it holds at its peak adds to theirs. ``compile`` as label_logps.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    selected = hidden.flatten(0, 1).index_select(0, positions)
    rows = max(1, chunk_elements // _padded(weight.shape[0], multiple))
    targets = labels.flatten().index_select(0, positions)
    picked = _LabelLogps.apply(selected.to(dtype), targets, rows, weight, weight.shape[0], compile, multiple)

    def at_positions(values: torch.Tensor) -> torch.Tensor:  # [len(positions)] -> [N, T], 0 elsewhere
        return values.new_zeros(labels.numel()).index_copy(0, positions, values).view(labels.shape)

    if not with_logit_sums:
        return at_positions(picked), None
    with torch.no_grad():  # elementwise, so autocast leaves it in fp32: sum_v h . w_v = h . sum_v w_v
        sums = (selected.float() * weight.sum(0, dtype=torch.float32)).sum(-1)
    return at_positions(picked), at_positions(sums)


def _padded(vocab: int, multiple: int | None) -> int:
    """The head's rows padded to a multiple of ``multiple`` (None: not padded; head_label_logps)."""
    return vocab + -vocab % multiple if multiple else vocab


def _aligned_head(weight: torch.Tensor, dtype: torch.dtype, multiple: int | None) -> torch.Tensor:
    """``weight`` [V, H] in ``dtype`` with zero rows appended up to _padded(V, multiple) rows: one copy, where a cast
    and then a pad made two; ``weight`` itself when it already has both."""
    vocab, padded = weight.shape[0], _padded(weight.shape[0], multiple)
    if weight.dtype == dtype and vocab == padded:
        return weight
    head = weight.new_empty((padded, weight.shape[1]), dtype=dtype)
    head[:vocab].copy_(weight)
    head[vocab:].zero_()
    return head


@functools.cache
def _sums_low_precision_into_fp32(device: torch.device) -> bool:
    """Whether ``torch.addmm`` on this CUDA device adds a product of bf16 factors into an fp32 ``out`` in place (the
    ``out_dtype`` overload with an fp32 input: torch >= 2.10, compute capability >= 8). Tried once per device."""
    total = torch.zeros(1, 1, device=device)
    factor = torch.ones(1, 1, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(total, factor, factor, out_dtype=torch.float32, out=total)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return total.item() == 1.0


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` without forming the product where torch can: in place for factors of total's dtype, and
    for bf16/fp16 factors into an fp32 total on a CUDA GPU that allows it (_sums_low_precision_into_fp32), summed in
    fp32 by cuBLAS (as Liger-Kernel's fused linear cross entropy does). Elsewhere (the CPU, older GPUs or torch)
    through the product: no mixed-dtype matmul there."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif (
        a.dtype in (torch.bfloat16, torch.float16)
        and total.dtype == torch.float32
        and total.is_cuda
        and _sums_low_precision_into_fp32(total.device)
    ):
        torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    else:
        total += a @ b


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, target logit) of each row of a chunk of logits, in float32; columns from ``vocab`` on are
    padding."""
    return logits[:, :vocab].float().logsumexp(-1), logits.gather(-1, targets[:, None]).squeeze(-1).float()


def _chunk_grad(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, vocab: int, out: torch.Tensor
) -> None:
    """d logp(target) / d logits = onehot(target) - softmax, times each row's incoming gradient, written into ``out``
    (the gradient's slice of the logits; ``logits`` themselves when the backward formed them for this chunk alone),
    0 in the padding columns (from ``vocab`` on). Element-wise throughout, so compiled it is one pass over the chunk
    that stores straight into ``out``: no new buffer, no fp32 copy. Eager, in place, it holds about two fp32
    copies of the chunk at once."""
    columns = torch.arange(logits.shape[-1], device=logits.device)
    rows = (logits.float() - lse[:, None]).exp_().mul_(-grad[:, None])  # -softmax * grad
    rows.add_((columns == targets[:, None]) * grad[:, None])  # + grad at the target
    if vocab < logits.shape[-1]:
        rows.masked_fill_(columns >= vocab, 0.0)
    out.copy_(rows)


@functools.cache
def _compiled_chunk_ops() -> tuple:
    """_chunk_stats and _chunk_grad compiled once per process, for any number of rows (dynamic shapes)."""
    return torch.compile(_chunk_stats, dynamic=True), torch.compile(_chunk_grad, dynamic=True)


class _LabelLogps(torch.autograd.Function):
    """log p(target) of each row of the logits [M, V], ``rows`` rows at a time: logit - logsumexp. The logits are
    ``inputs`` (label_logps; columns from ``vocab`` on are padding, no token's), or with ``weight`` [vocab, H]
    ``inputs @ weight.T`` of hidden states [M, H] through the head in the inputs' dtype, padded to ``multiple``
    (_aligned_head), recomputed chunk by chunk in the backward (head_label_logps). ``compile``: the chunks'
    element-wise work compiled (_compiled_chunk_ops)."""

    @staticmethod
    def forward(
        ctx,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        rows: int,
        weight: torch.Tensor | None,
        vocab: int,
        compile: bool,
        multiple: int | None,
    ) -> torch.Tensor:
        ctx.stats, ctx.grad = _compiled_chunk_ops() if compile else (_chunk_stats, _chunk_grad)
        head = None if weight is None else _aligned_head(weight, inputs.dtype, multiple)
        lse, picked = zip(
            *(
                ctx.stats(chunk if head is None else chunk @ head.T, target, vocab)
                for chunk, target in zip(inputs.split(rows), targets.split(rows), strict=True)
            ),
            strict=True,
        )
        lse = torch.cat(lse)
        ctx.save_for_backward(inputs, targets, lse, head)
        ctx.rows, ctx.vocab = rows, vocab
        ctx.weight_dtype = None if weight is None else weight.dtype
        return torch.cat(picked) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, torch.Tensor | None, None, None, None]:
        """Through the head: d/d hidden = d/d logits @ head and d/d weight = (d/d logits).T @ hidden over the
        vocabulary's rows (the padding's are dropped), summed over the chunks in float32, returned in the weight's
        dtype (no copy for an fp32 weight)."""
        inputs, targets, lse, head = ctx.saved_tensors
        grad_inputs = torch.empty_like(inputs)
        grad_weight = None
        if head is not None and ctx.needs_input_grad[3]:
            grad_weight = head.new_zeros((ctx.vocab, head.shape[1]), dtype=torch.float32)
        chunks = (x.split(ctx.rows) for x in (inputs, targets, lse, grad, grad_inputs))
        for chunk, target, s, g, out in zip(*chunks, strict=True):
            if head is None:
                ctx.grad(chunk, target, s, g, ctx.vocab, out)
                continue
            rows = chunk @ head.T
            ctx.grad(rows, target, s, g, ctx.vocab, rows)  # the logits become their gradient
            torch.mm(rows, head, out=out)
            if grad_weight is not None:
                _add_product(grad_weight, rows[:, : ctx.vocab].T, chunk)
        grad_weight = None if grad_weight is None else grad_weight.to(ctx.weight_dtype)
        return grad_inputs, None, None, grad_weight, None, None, None
