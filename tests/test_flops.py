"""Training FLOPs for MFU: one count (lmlab.core.models.flops_per_batch, cached per batch shape by
TrainingModule._count_flops) for every objective, frozen parameters counted forward only."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, compose_cfg

from lightning_modules.classifier import ClassifierModule, trainable_names
from lightning_modules.lm import LMModule
from lmlab.core.models import build_model, count_parameters, flops_per_batch

OPTIM = {"weight_decay": 0.1, "decay_embeddings": False}  # never read before configure_optimizers


def tiny_model(tokenizer, model: str, labels=None):
    cfg = compose_cfg(REPO / "outputs" / "unused", [f"model={model}"])
    return build_model(cfg.model, tokenizer, labels)


def attention(model, seq_len: int) -> int:
    cfg = model.config.get_text_config()
    return 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


@pytest.mark.parametrize("policy", ["head", "head+last_block", "all"])
def test_a_classifier_counts_frozen_parameters_forward_only(policy, tiny_tokenizer):
    model = tiny_model(tiny_tokenizer, "gpt2-tiny", ["ham", "spam"])
    module = ClassifierModule(model, OPTIM, ["ham", "spam"], policy, positive=None, max_fpr=0.02)
    trainable = trainable_names(model, policy)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    tables = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()  # look-ups: no matmuls
    n_all = count_parameters(model) - tables
    matmuls = trainable - {"transformer.wte.weight", "transformer.wpe.weight"}
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in matmuls)
    assert n_trainable < n_all or policy == "all"
    per_token = 2 * n_all + 4 * n_trainable + attention(model, 24)
    batch = {"input_ids": torch.zeros(3, 24, dtype=torch.long), "labels": torch.zeros(3, dtype=torch.long)}
    module._count_flops(batch)
    assert module.flops_per_batch == flops_per_batch(model, (3, 24), (3,)) == 3 * 24 * per_token
    if policy == "all":  # everything trains: the 6N of an LM
        assert per_token == 6 * n_all + attention(model, 24)


def test_an_lm_with_frozen_tied_embeddings_still_backpropagates_through_its_head(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer, "llama-tiny")
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight  # llama-tiny ties them
    n = count_parameters(model)  # the table once, counted as the head's matmul
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "labels": torch.zeros(2, 16, dtype=torch.long)}
    everything = LMModule(model, OPTIM)
    everything._count_flops(batch)
    assert everything.flops_per_batch == 2 * 16 * (6 * n + attention(model, 16))  # unchanged when all trains
    frozen = LMModule(tiny_model(tiny_tokenizer, "llama-tiny"), OPTIM, freeze=["embeddings"])
    frozen._count_flops(batch)
    # forward over all, weight and input gradients (4) over the rest, the frozen head's input gradient (2)
    expected = 2 * 16 * (2 * n + 4 * (n - head.numel()) + 2 * head.numel() + attention(model, 16))
    assert frozen.flops_per_batch == expected


def test_a_frozen_encoder_counts_forward_only(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer, "t5-tiny")
    shapes = (2, 20), (2, 6)
    full = flops_per_batch(model, *shapes)
    module = LMModule(model, OPTIM, freeze=["encoder"])
    encoder = count_parameters(model.get_encoder()) - model.get_input_embeddings().weight.numel()
    batch = {"input_ids": torch.zeros(shapes[0], dtype=torch.long), "labels": torch.zeros(shapes[1], dtype=torch.long)}
    module._count_flops(batch)
    head = model.get_output_embeddings().weight  # transformers 5 ties T5's head to the encoder's shared table
    frozen_head = 0 if head.requires_grad else head.numel()  # then it freezes with the encoder: 6 -> 4 (input gradient)
    # 6 -> 2 per encoder parameter and encoder token
    assert module.flops_per_batch == full - 2 * 20 * 4 * encoder - 2 * 6 * 2 * frozen_head


def test_count_flops_is_cached_per_shape_and_scaled_by_factor(tiny_tokenizer, monkeypatch):
    module = LMModule(tiny_model(tiny_tokenizer, "llama-tiny"), OPTIM)
    batch = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "labels": torch.zeros(2, 16, dtype=torch.long)}
    module._count_flops(batch)
    once = module.flops_per_batch
    monkeypatch.setattr("lightning_modules.base.flops_per_batch", lambda *a: pytest.fail("counted twice"))
    module._count_flops(batch, factor=4 / 3)  # DPO with a live reference: one more forward pass
    assert module.flops_per_batch == once * 4 / 3
