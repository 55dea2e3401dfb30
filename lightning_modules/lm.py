"""Language modelling (pretraining and SFT) for causal and encoder-decoder models: mean cross entropy over
non -100 labels."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_modules.base import TrainingModule
from lmlab.core.collate import IGNORE_INDEX, varlen_kwargs
from lmlab.core.losses import label_hits, label_token_stats
from lmlab.core.models import is_vision_language
from lmlab.core.vision import PARTS, parts

GROUPS = ("embeddings", "encoder", *PARTS)  # named parameter groups of freeze=[...]; other entries are regexes


def lm_forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], with_loss: bool):
    """The model's output on a batch of lmlab.core.collate; logits align with ``batch["labels"]``.

    A causal batch's labels are pre-shifted (``shift_labels``). An encoder-decoder builds its
    decoder inputs from the labels (start token, then the labels shifted right); without
    ``with_loss`` they go in as those decoder inputs, so no loss is computed that nobody reads.

    A causal batch goes in without its padding mask. Its padding is on the right (lmlab.core.collate), so under the
    causal mask no token attends to a pad after it, and pads carry -100 labels: the logits and the loss that count
    are the same. Given any mask tensor, even all ones, SDPA runs its memory-efficient kernel without causal block
    skipping instead of the causal (FlashAttention) one. A MoE keeps the mask: its load-balancing loss reads it to
    leave the pads out. A packed batch (lmlab.core.collate.PackedCausalCollator) has no mask and passes its
    ``position_ids``, from which transformers keeps each sample to itself. A vision-language batch
    (datamodules/vision.py) adds its images' ``pixel_values``, whose features fill the image placeholder positions.
    """
    labels = batch["labels"] if with_loss else None
    if model.config.is_encoder_decoder:
        decoder_input_ids = None if with_loss else model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        )
    return model(**causal_inputs(model, batch), labels=labels, shift_labels=labels)


def causal_inputs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool | None]:
    """A causal model's inputs of a batch (lm_forward says why without a padding mask), for it or its base model."""
    routed = getattr(model.config, "output_router_logits", False)
    images = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}  # a vision-language model's
    return {
        **images,
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask") if routed else None,  # a packed batch has none
        "position_ids": batch.get("position_ids"),  # packed: restarting per sample, which isolates the samples
        "use_cache": False,
        **varlen_kwargs(batch),  # packed: the samples' bounds, for packed_attention=varlen
    }


def freeze_parameters(model: PreTrainedModel, patterns: Sequence[str]) -> list[str]:
    """Set requires_grad=False on matching parameters; returns their names.

    ``embeddings`` means the input token embeddings (and a head tied to them), ``encoder`` the
    whole encoder of an encoder-decoder (with T5's shared embeddings, which it holds); ``vision``,
    ``projector`` and ``language`` the parts of a vision-language model (stage=vlm: its vision tower,
    its projector, its language model with the output head); any other entry is a regular expression
    matched against parameter names.
    """
    frozen_ids = set()
    for part in PARTS:
        if part in patterns:
            if not is_vision_language(model.config):
                raise ValueError(f"freeze=[{part}]: {type(model).__name__} is no vision-language model")
            frozen_ids.update(id(p) for module in parts(model)[part] for p in module.parameters())
    if "embeddings" in patterns:
        frozen_ids.add(id(model.get_input_embeddings().weight))
    if "encoder" in patterns:
        if not model.config.is_encoder_decoder:
            raise ValueError(f"freeze=[encoder]: {type(model).__name__} has no encoder")
        frozen_ids.update(id(p) for p in model.get_encoder().parameters())
    regexes = [re.compile(p) for p in patterns if p not in GROUPS]
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in frozen_ids or any(r.search(name) for r in regexes):
            p.requires_grad_(False)
            names.append(name)
    if patterns and not names:
        raise ValueError(f"freeze={list(patterns)} matched no parameter of {type(model).__name__}")
    return names


class LMModule(TrainingModule):
    """Wraps a transformers causal LM or encoder-decoder (T5); see lmlab.core.collate for the batches.

    A causal batch carries pre-shifted labels; an encoder-decoder batch carries the encoder's
    input_ids and the decoder's labels, which the model shifts right behind its decoder start
    token to make the decoder inputs. The training loss is the model's own (for a causal LM
    ``labels`` + ``shift_labels``), so with ``compile``
    the cross entropy is compiled together with the forward pass and the fp32 logits are
    never materialised; for a mixture of experts it includes the router load-balancing term
    (``router_aux_loss_coef`` in the model config). Every label token of an optimizer step weighs
    the same in its gradient, across gradient accumulation and DDP ranks (TrainingModule._token_weighted;
    a router term weighs as its micro-batch's tokens); train/loss logs each micro-batch's mean.
    Validation loss is the plain token-weighted cross entropy, so val/ppl is a true perplexity.
    """

    def __init__(self, model: PreTrainedModel, optim: dict, freeze: Sequence[str] = (), compile: bool | str = False):
        super().__init__(model, optim, compile)
        self.save_hyperparameters(ignore=["model"])
        self.frozen = freeze_parameters(model, list(freeze))
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def _forward(self, batch: dict[str, torch.Tensor], with_loss: bool):
        return lm_forward(self.model, batch, with_loss)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._count_flops(batch)
        out = self._forward(batch, with_loss=True)
        loss = out.loss
        self._track_non_finite(loss)
        if self._on_log_step():
            self.log("train/loss", loss)
            if out.logits is not None:  # Liger's fused loss (kernels.fused_linear_cross_entropy) forms no logits
                with torch.no_grad():
                    correct, n = label_hits(out.logits, batch["labels"])
                    self.log("train/acc", correct / n.clamp(min=1))
            self.log("train/ppl", torch.exp(loss.detach()))
        return self._token_weighted(loss, (batch["labels"] != IGNORE_INDEX).sum())

    def on_validation_epoch_start(self) -> None:
        """A running loss per named validation set when the datamodule gives a dict of val loaders (a mixture's
        per-source slices, datamodules/pretrain.py), in the loaders' order (Lightning's dataloader_idx)."""
        loaders = self.trainer.val_dataloaders
        names = list(loaders) if isinstance(loaders, dict) else []
        self.val_loss_by_source = [(name, MeanMetric().to(self.device)) for name in names]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self._forward(batch, with_loss=False).logits
        nll, correct, n = label_token_stats(logits, batch["labels"])
        loss, acc = nll / n.clamp(min=1), correct / n.clamp(min=1)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(acc, weight=n)
        if self.val_loss_by_source:
            self.val_loss_by_source[dataloader_idx][1].update(loss, weight=n)

    def on_validation_epoch_end(self) -> None:
        """val/loss over every validation window of every loader (token-weighted), and per named set val/loss/<name>.

        So the overall val/loss is the per-source losses averaged by their label tokens, and a stage that monitors
        val/loss behaves the same with one loader or many.
        """
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self.log("val/acc", self.val_acc.compute())
        self.val_loss.reset()
        self.val_acc.reset()
        for name, metric in self.val_loss_by_source:
            source_loss = metric.compute()
            self.log(f"val/loss/{name}", source_loss)
            self.log(f"val/ppl/{name}", torch.exp(source_loss))
