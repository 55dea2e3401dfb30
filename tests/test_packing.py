"""packing=true (issue 15): an SFT, DPO or classification batch's samples end to end in one row, without padding, each
attending to itself only. The packed logits, losses, DPO's per-sample log-probs and metrics, class logits, gradients and
training curves equal the padded batch's, per sample."""

from __future__ import annotations

import contextlib
import csv
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from datamodules.classification import ClassificationCollator, PackedClassificationCollator
from lightning_modules.base import TrainingModule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.dpo import DPOModule
from lightning_modules.lm import lm_forward
from lmlab.core import models
from lmlab.core.collate import IGNORE_INDEX, CausalCollator, PackedCausalCollator, PreferenceCollator
from lmlab.core.models import flops_per_batch, flops_per_token, sdpa_settings
from train import attention as run_attention
from train import train

VOCAB = 50
LENGTHS = [7, 3, 12, 5]  # tokens per sample (aligned ids and labels, before the shift)


def samples(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random samples whose labels mask a prompt of 2 tokens, as SFT's do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:2] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_the_packed_row_restarts_positions_and_shifts_each_sample_on_its_own():
    batch = PackedCausalCollator(pad_id=0, pad_to_multiple_of=8)(samples())
    shifted = [n - 1 for n in LENGTHS]  # 6 + 2 + 11 + 4 = 23 tokens, padded to 24
    assert batch["document_lengths"] == shifted and "attention_mask" not in batch
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 24)
    expected_positions = [p for n in [*shifted, 1] for p in range(n)]
    assert batch["position_ids"][0].tolist() == expected_positions
    start = 0
    for sample, n in zip(samples(), shifted, strict=True):
        assert batch["input_ids"][0, start : start + n].tolist() == sample["input_ids"][:-1].tolist()
        # no position predicts the next sample's first token: each sample's last target is its own last token
        assert batch["labels"][0, start : start + n].tolist() == sample["labels"][1:].tolist()
        start += n
    assert batch["input_ids"][0, 23] == 0 and batch["labels"][0, 23] == IGNORE_INDEX
    # the segments of a varlen kernel: each sample, then the tail (an empty one when the samples fill the row)
    assert batch["cu_seq_lens"].dtype == torch.int32
    # the longest segment (11) rounded up to the pad multiple: an upper bound, with few distinct values
    assert batch["cu_seq_lens"].tolist() == [0, 6, 8, 19, 23, 24] and batch["max_document_length"] == 16
    full = PackedCausalCollator(pad_id=0)(samples())
    assert full["cu_seq_lens"].tolist() == [0, 6, 8, 19, 23, 23] and full["input_ids"].shape == (1, 23)


def reference_varlen_attn(calls, q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
    """torch's varlen_attn (CUDA only) as its documentation defines it, for the CPU: SDPA over each segment of
    ``[T, heads, head_dim]`` rows alone, a query seeing the keys at most ``window_size = (left, right)`` positions
    before and after it (-1: unbounded; (-1, 0) is causal); torch 2.11's signature (no enable_gqa)."""
    bounds = cu_q.tolist()
    # the kernel's max lengths bound every segment (pack rounds the longest up to the pad multiple)
    assert cu_k.tolist() == bounds and max_q == max_k >= max(b - a for a, b in itertools.pairwise(bounds))
    calls.append(len(bounds) - 1)
    left, right = window_size
    out = torch.zeros_like(q)
    for a, b in itertools.pairwise(bounds):
        if b > a:
            seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            offset = torch.arange(b - a)[None, :] - torch.arange(b - a)[:, None]  # key - query
            seen = torch.ones(b - a, b - a, dtype=torch.bool)
            if right >= 0:
                seen &= offset <= right
            if left >= 0:
                seen &= offset >= -left
            out[a:b] = F.scaled_dot_product_attention(*seg, attn_mask=seen, scale=scale).transpose(0, 1)
    return out


@contextlib.contextmanager
def attending(attention: str, monkeypatch) -> list[int]:
    """lmlab's sdpa attention with packed_attention=varlen (torch's kernel replaced by reference_varlen_attn, so the
    CPU runs lmlab's path to it) or =mask; yields the segments of each varlen call."""
    calls = []
    if attention == "varlen":
        monkeypatch.setattr(models, "varlen_attn", functools.partial(reference_varlen_attn, calls))
    with sdpa_settings(False, varlen=attention == "varlen"):
        yield calls


TINY = {  # family -> config and model classes, and what it adds to the shared 2-layer decoder shape
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 2}),  # 2 per key head
    "mistral": (  # a query sees its 4 latest keys
        MistralConfig,
        MistralForCausalLM,
        {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4},
    ),
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        {"num_attention_heads": 2, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


def tiny(family: str, attention: str, positions: int = 64) -> torch.nn.Module:
    """A 2-layer model of ``family``; a GPT-2 embeds ``positions`` positions."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=positions)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        model = GPT2LMHeadModel(config)
    else:
        config_class, model_class, extra = TINY[family]
        shape = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
        model = model_class(config_class(**shape, **extra))
    model.config._attn_implementation = attention
    return model.eval()


@pytest.mark.parametrize("attention", ["mask", "eager", "varlen"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "mistral"])
def test_packed_logits_loss_and_gradients_equal_the_padded_batchs(family, attention, monkeypatch):
    """Under sdpa with a mask over the row, eager, and lmlab's varlen path (each layer's attention over the 4 samples
    and the tail; llama's and mistral's with 2 query heads per key head, mistral's within a sliding window of 4)."""
    model = tiny(family, "eager" if attention == "eager" else "sdpa")
    padded = CausalCollator(pad_id=0)(samples())
    packed = PackedCausalCollator(pad_id=0, pad_to_multiple_of=8)(samples())
    with attending(attention, monkeypatch) as calls:
        out_padded = lm_forward(model, padded, with_loss=True)
        out_padded.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        out_packed = lm_forward(model, packed, with_loss=True)
        out_packed.loss.backward()
    assert calls == ([5, 5] if attention == "varlen" else [])  # 2 layers, the padded batch never
    start = 0
    for row, n in enumerate(packed["document_lengths"]):
        torch.testing.assert_close(out_packed.logits[0, start : start + n], out_padded.logits[row, :n])
        start += n
    torch.testing.assert_close(out_packed.loss, out_padded.loss)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_packed_flops_count_the_attention_per_sample():
    model = tiny("llama", "sdpa")
    module = TrainingModule(model, optim={})
    packed = PackedCausalCollator(pad_id=0, pad_to_multiple_of=8)(samples())
    module._count_flops(packed)
    per_sample = sum(flops_per_batch(model, (1, n), (1, n)) for n in packed["document_lengths"])
    tail = flops_per_token(model, 0)  # the one padding token: its matmuls, no attention term
    assert module.flops_per_batch == pytest.approx(per_sample + tail)


def losses(run) -> dict[str, list[float]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in ("train/loss", "val/loss")}


@pytest.mark.parametrize(
    "stage",
    [["stage=sft"], ["stage=dpo"], ["stage=dpo", "stage.module.reference=precomputed"], ["stage=classify"]],
    ids=lambda o: o[-1],
)
def test_a_packed_run_trains_as_the_padded_one(tmp_path, stage):
    """Same seed, same samples per step: the same loss at every step, and the same validation loss."""
    common = [
        *stage,
        "max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=3",
        "callbacks.samples.num_prompts=0",
    ]
    train(compose_cfg(tmp_path / "padded", common))
    train(compose_cfg(tmp_path / "packed", [*common, "packing=true"]))
    padded, packed = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert len(padded["train/loss"]) == 6 and len(padded["val/loss"]) == 2
    for key in padded:
        assert packed[key] == pytest.approx(padded[key], rel=1e-4), key


def pairs(seed: int = 0) -> list[dict]:
    """Preference items of the samples above, each chosen answer paired with another sample as rejected."""
    items = samples(seed)
    return [{"chosen": items[i], "rejected": items[(i + 1) % len(items)]} for i in range(len(items))]


@pytest.mark.parametrize(("loss_type", "rpo_alpha"), [("sigmoid", 0.5), ("ipo", 0.0)])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_packed_and_fused_dpo_loss_metrics_and_gradients_equal_the_padded_batchs(
    family, loss_type, rpo_alpha, monkeypatch
):
    """DPO's per-sample log-probs, loss (with RPO's SFT term), TRL's metrics and the gradients of one packed row equal
    the padded batch's, from formed logits and with the fused LM head (fused_lm_head: hidden states at the label
    positions), the packed row's attention masked or varlen (attending)."""
    optim = {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3}}
    model = tiny(family, "sdpa")
    module = DPOModule(model, optim, beta=0.1, loss_type=loss_type, rpo_alpha=rpo_alpha, fused_lm_head=True)
    assert module.fused_policy and module.fused_reference
    results = []
    padded, packed = CausalCollator(pad_id=0), PackedCausalCollator(pad_id=0, pad_to_multiple_of=8)
    for inner, fused, attention in [(padded, False, "mask"), (padded, True, "mask")] + [
        (packed, fused, attention) for fused in (False, True) for attention in ("mask", "varlen")
    ]:
        module.fused_policy = module.fused_reference = fused
        module.zero_grad()
        with attending(attention, monkeypatch) as calls:
            loss, metrics = module._step(PreferenceCollator(inner)(pairs()), with_metrics=True)
            loss.backward()
        assert len(calls) == (4 if attention == "varlen" else 0)  # policy and reference, 2 layers each
        grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
        results.append((loss, metrics, grads))
    (loss, metrics, grads), *others = results
    for other_loss, other_metrics, other_grads in others:
        torch.testing.assert_close(other_loss, loss)
        assert other_metrics.keys() == metrics.keys()
        for name in metrics:
            torch.testing.assert_close(other_metrics[name], metrics[name], msg=name)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], msg=name)


@pytest.mark.parametrize("attention", ["mask", "varlen"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_packed_class_logits_loss_and_gradients_equal_the_padded_batchs(family, attention, monkeypatch):
    """A packed classification row (texts end to end, positions restarting) pools each text where the padded batch
    does, at its last token that is not the pad id (one text ends in it): the same class logits as the padded batch,
    per text, and the same loss and gradients."""
    lm = tiny(family, "sdpa")
    config = lm.config
    config.num_labels, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    module = ClassifierModule(
        AutoModelForSequenceClassification.from_config(config).eval(), {}, ["ham", "spam"], "all", None, 0.0
    )
    texts = [{"input_ids": s["input_ids"], "label": i % 2} for i, s in enumerate(samples())]
    texts[1]["input_ids"] = torch.cat([texts[1]["input_ids"], torch.tensor([0])])  # ends in the pad id (an EOS)
    outs = []
    with attending(attention, monkeypatch) as calls:
        for collate in (ClassificationCollator(0, "right"), PackedClassificationCollator(0, pad_to_multiple_of=8)):
            batch = collate(texts)
            logits = module(batch)
            module._loss(logits, batch["labels"]).backward()
            outs.append((logits, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
            module.zero_grad()
    assert len(calls) == (2 if attention == "varlen" else 0)
    (padded, padded_grads), (packed, packed_grads) = outs
    assert packed.shape == (len(texts), 2)
    torch.testing.assert_close(packed, padded)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, msg=name)


@pytest.mark.parametrize("overrides", [["stage=sft", "model=t5-tiny"], ["stage=dpo", "model=t5-tiny"]])
def test_packing_where_it_does_not_apply_is_an_error(tmp_path, overrides):
    with pytest.raises(ValueError, match="packing=true packs SFT, DPO and classification samples for a causal model"):
        train(compose_cfg(tmp_path, [*overrides, "packing=true", "max_steps=1"]))


def test_packed_attention_is_varlen_where_it_can_run_and_names_what_is_missing(tmp_path):
    """auto: varlen on a 16-bit GPU run with sdpa attention, else mask; an explicit varlen where it cannot run is an
    error that names what is missing; a value that is none of the three is an error."""
    gpu = ["trainer=gpu"]  # bf16-mixed: composing and resolving it needs no GPU
    for overrides, varlen in (([], False), (gpu, True), ([*gpu, "model.attn_implementation=eager"], False)):
        with run_attention(compose_cfg(tmp_path, ["packed_attention=auto", *overrides])):
            assert models.AttentionInterface()["sdpa"].keywords["varlen"] is varlen, overrides
    with run_attention(compose_cfg(tmp_path, [*gpu, "packed_attention=mask"])):
        assert models.AttentionInterface()["sdpa"].keywords["varlen"] is False
    with pytest.raises(ValueError, match=r"packed_attention=varlen needs a GPU .*, 16-bit precision"):
        run_attention(compose_cfg(tmp_path, ["packed_attention=varlen"]))
    with pytest.raises(ValueError, match="packed_attention='flex': one of auto, varlen, mask"):
        run_attention(compose_cfg(tmp_path, ["packed_attention=flex"]))


def test_a_compiled_module_traces_one_graph_for_packed_rows_of_any_width():
    """compile=true: the module marks a packed batch's sizes dynamic as it reaches the device
    (TrainingModule.on_after_batch_transfer), so rows of four widths and an epoch's short last batch share one graph
    under the mask (torch's default traces a second one at the second width). Dynamo's eager backend: the tracing
    without inductor. Under varlen the longest sample's length, a Python int, still costs a second graph at the second
    batch."""
    from torch._dynamo.testing import CompileCounter

    module = TrainingModule(tiny("llama", "sdpa", positions=512), optim={}, compile=True)
    graphs = CompileCounter()
    compiled = torch.compile(module.model, backend=graphs)
    g = torch.Generator().manual_seed(0)
    for n, longest in ((4, 40), (4, 90), (4, 20), (2, 9)):
        rows = [
            torch.randint(1, VOCAB, (int(torch.randint(2, longest, (1,), generator=g)),), generator=g) for _ in range(n)
        ]
        batch = module.on_after_batch_transfer(
            PackedCausalCollator(pad_id=0)([{"input_ids": r, "labels": r} for r in rows]), 0
        )
        lm_forward(compiled, batch, with_loss=True).loss.backward()
    assert graphs.frame_count == 1
