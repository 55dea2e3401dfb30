"""DPO loss functions against independent plain-math computations of TRL's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_modules import dpo
from lightning_modules.dpo_loss import (
    LOSS_TYPES,
    label_counts,
    masked_mean_logits,
    preference_loss,
    preference_metrics,
    rpo_nll,
    sequence_logps,
)
from lmlab.core.losses import head_label_logps, label_logps
from lmlab.core.models import align_lm_head, build_model

POLICY_CHOSEN = [-3.0, -5.0, -2.0]
POLICY_REJECTED = [-4.0, -4.5, -6.0]
REF_CHOSEN = [-3.5, -5.2, -2.5]
REF_REJECTED = [-3.9, -4.1, -5.0]


def tensors() -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.tensor(x, dtype=torch.float64) for x in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    )


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def expected_losses(loss_type: str, beta: float, label_smoothing: float = 0.0) -> list[float]:
    """TRL's per-pair losses, written out with math on Python floats."""
    out = []
    for pc, pr, rc, rr in zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, strict=True):
        z = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":
            out.append(-log_sigmoid(beta * z) * (1 - label_smoothing) - log_sigmoid(-beta * z) * label_smoothing)
        elif loss_type == "ipo":
            out.append((z - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - beta * z))
    return out


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_losses_and_rewards_match_plain_math(loss_type, label_smoothing, beta):
    losses, chosen_rewards, rejected_rewards = preference_loss(
        *tensors(), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    assert losses.tolist() == pytest.approx(expected_losses(loss_type, beta, label_smoothing), rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx(
        [beta * (pc - rc) for pc, rc in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)], rel=1e-12
    )
    assert rejected_rewards.tolist() == pytest.approx(
        [beta * (pr - rr) for pr, rr in zip(POLICY_REJECTED, REF_REJECTED, strict=True)], rel=1e-12
    )


def test_hand_computed_first_pair():
    # z = (-3 + 4) - (-3.5 + 3.9) = 0.6; beta = 0.1 -> -log sigmoid(0.06) = log(1 + e^-0.06)
    losses, _, _ = preference_loss(*tensors(), beta=0.1)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-0.06)), rel=1e-12)


def test_sigmoid_is_log2_at_zero_and_falls_with_margin():
    zero = torch.zeros(1)
    losses, _, _ = preference_loss(zero, zero, zero, zero, beta=0.1)
    assert losses.item() == pytest.approx(math.log(2))
    margins = torch.tensor([-2.0, 0.0, 1.0, 5.0, 20.0])
    losses, _, _ = preference_loss(margins, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=0.5)
    assert (losses.diff() < 0).all()


def test_hinge_is_zero_once_margin_reaches_one_over_beta():
    beta = 0.5
    margins = torch.tensor([1.0, 1.9, 2.0, 3.0, 10.0])  # beta * margin: 0.5, 0.95, 1, 1.5, 5
    losses, _, _ = preference_loss(
        margins, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=beta, loss_type="hinge"
    )
    assert losses[:2].tolist() == pytest.approx([0.5, 0.05])
    assert losses[2:].tolist() == [0.0, 0.0, 0.0]


def test_gradient_flows_to_policy_only():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = tensors()
    policy_chosen.requires_grad_(True)
    policy_rejected.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1
    )
    losses.sum().backward()
    assert (policy_chosen.grad < 0).all()  # raising the chosen logp lowers the loss
    assert (policy_rejected.grad > 0).all()
    assert ref_chosen.grad is None and ref_rejected.grad is None
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_type": "kto"}, "sigmoid"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only defined"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "only defined"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(*tensors(), beta=0.1, **kwargs)


def test_unknown_loss_type_lists_choices():
    with pytest.raises(ValueError) as info:
        preference_loss(*tensors(), beta=0.1, loss_type="nope")
    assert all(name in str(info.value) for name in LOSS_TYPES)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, :2] = -100  # prompt
    labels[1, 4] = -100  # padding
    labels[2, 1:4] = -100
    return logits, labels


def manual_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    sums, counts = [], []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for pos in range(labels.shape[1]):
            target = int(labels[row, pos])
            if target != -100:
                total += torch.log_softmax(logits[row, pos], dim=-1)[target].item()
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def logits_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """sequence_logps of the logits' per-token log-probs (lmlab.core.losses.label_logps)."""
    return sequence_logps(label_logps(logits, labels), labels, average)


def test_sequence_logps_matches_manual_loop():
    logits, labels = batch()
    sums, counts = manual_logps(logits, labels)
    assert counts == [3, 4, 2]
    assert logits_logps(logits, labels).tolist() == pytest.approx(sums, rel=1e-6)
    averaged = logits_logps(logits, labels, average=True)
    assert averaged.tolist() == pytest.approx([s / c for s, c in zip(sums, counts, strict=True)], rel=1e-6)
    assert label_counts(labels).tolist() == counts


def test_sequence_logps_ignores_masked_positions():
    logits, labels = batch()
    changed = logits.clone()
    changed[labels == -100] = 1000.0 * torch.randn_like(changed[labels == -100])
    assert torch.equal(logits_logps(changed, labels), logits_logps(logits, labels))
    changed[0, 2, 0] += 1.0  # a label position does count
    assert not torch.equal(logits_logps(changed, labels), logits_logps(logits, labels))


def test_sequence_logps_empty_row():
    """An empty row sums and averages to 0 (no NaN), and leaves the other rows as they were."""
    logits, labels = batch()
    full = logits_logps(logits, labels, average=True)
    labels[1] = -100
    assert logits_logps(logits, labels)[1].item() == 0.0
    averaged = logits_logps(logits, labels, average=True)
    assert averaged[1].item() == 0.0
    torch.testing.assert_close(averaged[[0, 2]], full[[0, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logps_equal_cross_entropys_values_and_gradients_in_chunks(dtype):
    """Chunks of 2 positions (the vocabulary is 50): the chunked log-probs and their gradients are the fp32 cross
    entropy's, and a -100 position (a huge logit there included) neither counts nor gets a gradient."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 50)).to(dtype)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, :2] = labels[2] = -100
    logits[2, 0, 0] = 1e4
    weights = torch.randn(3, 5)

    def grad(logps_of):
        x = logits.clone().requires_grad_()
        logps = logps_of(x)
        (logps * weights).sum().backward()
        return logps, x.grad

    def plain(x: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(x.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100)
        return -nll.view(3, 5)

    ref, ref_grad = grad(plain)
    ours, our_grad = grad(lambda x: label_logps(x, labels, chunk_elements=100))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert our_grad[2].abs().sum() == 0 and (ours[2] == 0).all()


@pytest.mark.parametrize("multiple", [64, None])
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16 weights"])
def test_head_label_logps_equal_the_logits_values_and_gradients_without_forming_them(precision, multiple):
    """Hidden states through a head of 50 tokens (padded to 64 rows, or not), 2 positions a chunk: the label
    positions' log-probs, their gradients for the hidden states and the head, and the logit sums (TRL's logits
    metric) are those of the formed logits (label_logps); -100 positions count for nothing. Under bf16 autocast the
    head runs in bf16, as an nn.Linear head would, and so do bf16 weights without autocast (their gradient comes
    back in bf16); then the two sides agree to bf16's precision. A frozen head (the DPO reference's, or a policy's
    frozen embedding) gets no gradient and passes the same one to the hidden states."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    hidden, weight = torch.randn(3, 5, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype)
    labels = torch.randint(0, 50, (3, 5))
    labels[0, :2] = labels[2] = -100
    positions = labels.flatten().ne(-100).nonzero().squeeze(1)
    weights = torch.randn(3, 5)

    def run(fused: bool, frozen: bool = False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            if fused:
                logps, sums = head_label_logps(
                    h, w, labels, positions, with_logit_sums=True, chunk_elements=100, multiple=multiple
                )
            else:
                logits = h @ w.T
                logps, sums = label_logps(logits, labels), logits.detach().float().sum(-1) * labels.ne(-100)
        (logps * weights).sum().backward()
        return logps, sums, h.grad, w.grad

    tolerance = {"rtol": 1e-5, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    for ours, ref in zip(run(fused=True), run(fused=False), strict=True):
        torch.testing.assert_close(ours, ref, **tolerance)
    logps, sums, hidden_grad, weight_grad = run(fused=True)
    assert weight_grad.dtype == dtype
    assert (logps[2] == 0).all() and (sums[2] == 0).all() and hidden_grad[2].abs().sum() == 0
    *_, frozen_hidden_grad, no_grad = run(fused=True, frozen=True)
    assert no_grad is None
    torch.testing.assert_close(frozen_hidden_grad, hidden_grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "autocast, vocab, multiple", [(True, 50, 64), (False, 50, 64), (False, 64, 64), (False, 50, None), (True, 50, None)]
)
def test_head_label_logps_copy_the_head_once_and_sum_its_gradient_in_its_dtype(autocast, vocab, multiple):
    """Memory at DPO's peak (the fused head runs outside a compiled model's CUDA graphs, so what it holds adds to the
    graphs' pool): an fp32 head of 50 rows is copied once, in the autocast dtype and padded to ``multiple`` rows (the
    run's align_lm_head; None: not padded), and not at all where it already has both (64 fp32 rows, or 50 unpadded
    without autocast); its gradient is summed in one fp32 tensor of the weight's shape, which autograd gets as it is.
    On this CPU a bf16 autocast adds one bf16 product per chunk (a CUDA GPU sums into the fp32 tensor directly); fp32
    adds none. A cast and a pad as autograd ops made two copies forward and two more backward."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8, requires_grad=True), torch.randn(vocab, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 5))
    positions = torch.arange(labels.numel())
    padded = vocab + -vocab % multiple if multiple else vocab
    chunks = -(-labels.numel() // (200 // padded))  # 15 positions, 200 // padded rows a chunk
    made: list[tuple[tuple[int, ...], torch.dtype]] = []

    class HeadSized(TorchDispatchMode):
        """Records each new tensor (not an argument's storage: no in-place op, view or alias) of >= the head's size."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)}
            for t in pytree.tree_leaves(out):
                if torch.is_tensor(t) and t.numel() >= weight.numel() and t.untyped_storage().data_ptr() not in given:
                    made.append((tuple(t.shape), t.dtype))
            return out

    dtype = torch.bfloat16 if autocast else torch.float32
    with HeadSized():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps, _ = head_label_logps(hidden, weight, labels, positions, chunk_elements=200, multiple=multiple)
        forward = list(made)
        logps.sum().backward()
    assert forward == ([((padded, 8), dtype)] if padded != vocab or autocast else [])
    assert made[len(forward) :] == [((vocab, 8), torch.float32)] + [((vocab, 8), torch.bfloat16)] * chunks * autocast
    assert weight.grad.dtype == torch.float32 and weight.grad.shape == (vocab, 8)


@pytest.mark.parametrize("align", [64, None])
def test_the_fused_head_pads_as_the_runs_align_lm_head(align, tiny_tokenizer, tmp_path, monkeypatch):
    """DPO's fused head (answer_logps) pads the head to the multiple align_lm_head gave the model's LM head, and not
    at all with align_lm_head=null: one setting for both heads, with the same log-probs either way."""
    model = build_model(compose_cfg(tmp_path, ["model=gpt2-tiny"]).model, tiny_tokenizer)
    assert align_lm_head(model, align) == bool(align)
    multiples, real = [], dpo.head_label_logps

    def spy(*args, **kwargs):
        multiples.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "head_label_logps", spy)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(ids % 3 == 0, -100)}
    fused, _ = dpo.answer_logps(model, batch, fused=True)
    formed, _ = dpo.answer_logps(model, batch, fused=False)
    assert multiples == [align]
    torch.testing.assert_close(fused, formed)


def test_sequence_logps_keep_the_logits_not_an_fp32_log_softmax_for_the_backward():
    """What autograd keeps for DPO's backward: the bf16 logits and one float per position
    (lmlab.core.losses.label_logps), where the plain fp32 cross entropy kept an fp32 log-softmax of the whole
    [N, T, V] logits (twice their bf16 size). The logits are left as they were, in bf16 and in fp32."""
    labels = torch.randint(0, 1000, (4, 16))
    labels[:, :5] = -100

    def kept_bytes(logits: torch.Tensor, logps_of) -> int:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps_of(logits).sum().backward()
        return sum(kept.values())

    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(4, 16, 1000, dtype=dtype).requires_grad_()
        before = logits.detach().clone()
        size = logits.numel() * logits.element_size()
        plain = kept_bytes(
            logits, lambda x: F.cross_entropy(x.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        )
        ours = kept_bytes(logits, lambda x: logits_logps(x, labels))
        assert plain >= (2 if dtype == torch.bfloat16 else 1) * size
        assert ours <= size + 24 * labels.numel()
        assert torch.equal(logits.detach(), before)


def test_sequence_logps_rejects_misaligned_shapes():
    logits, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(label_logps(logits, labels)[:, :-1], labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mean_logits_matches_direct_mean(dtype):
    logits, labels = batch()
    logits = logits.to(dtype)
    expected = logits.float()[labels != -100].mean()
    result = masked_mean_logits(logits.sum(-1, dtype=torch.float32), labels, logits.shape[-1])
    assert result.dtype == torch.float32 and result.ndim == 0
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_preference_metrics_hand_example():
    chosen_rewards = torch.tensor([0.3, -0.1, 0.2])
    rejected_rewards = torch.tensor([0.1, 0.4, -0.2])  # pairs 0 and 2 correct
    metrics = preference_metrics(
        chosen_rewards,
        rejected_rewards,
        torch.tensor([-3.0, -5.0, -2.0]),
        torch.tensor([-4.0, -4.5, -6.0]),
        torch.tensor(0.25),
        torch.tensor(-0.5),
    )
    expected = {
        "rewards/chosen": 0.4 / 3,
        "rewards/rejected": 0.3 / 3,
        "rewards/accuracies": 2 / 3,
        "rewards/margins": (0.2 - 0.5 + 0.4) / 3,
        "logps/chosen": -10.0 / 3,
        "logps/rejected": -14.5 / 3,
        "logits/chosen": 0.25,
        "logits/rejected": -0.5,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6), name


def test_rpo_nll_is_mean_per_token_nll():
    logits, labels = batch()
    sums, counts = manual_logps(logits, labels)
    result = rpo_nll(logits_logps(logits, labels), label_counts(labels))
    assert result.item() == pytest.approx(sum(-s / c for s, c in zip(sums, counts, strict=True)) / 3, rel=1e-6)
    assert rpo_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)
