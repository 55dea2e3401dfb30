"""Causal language modelling (pretraining and SFT): mean cross entropy over non -100 labels."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from datamodules.collate import IGNORE_INDEX
from lightning_modules.optim import param_groups, warmup_cosine
from lmlab.models import flops_per_token


class NonFiniteLossError(RuntimeError):
    """Raised on a NaN/inf loss, before the optimizer step, so the last checkpoint stays the last good one."""


def freeze_parameters(model: PreTrainedModel, patterns: Sequence[str]) -> list[str]:
    """Set requires_grad=False on matching parameters; returns their names.

    ``embeddings`` means the input token embeddings (and a head tied to them); any other
    entry is a regular expression matched against parameter names.
    """
    frozen_ids = set()
    if "embeddings" in patterns:
        frozen_ids.add(id(model.get_input_embeddings().weight))
    regexes = [re.compile(p) for p in patterns if p != "embeddings"]
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in frozen_ids or any(r.search(name) for r in regexes):
            p.requires_grad_(False)
            names.append(name)
    if patterns and not names:
        raise ValueError(f"freeze={list(patterns)} matched no parameter of {type(model).__name__}")
    return names


class CausalLMModule(L.LightningModule):
    """Wraps a transformers causal LM. Batches carry pre-shifted labels (see datamodules.collate)."""

    def __init__(
        self,
        model: PreTrainedModel,
        optim: dict,
        freeze: Sequence[str] = (),
        compile: bool = False,
        router_aux_loss_coef: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.frozen = freeze_parameters(model, list(freeze))
        self._flops_per_token: dict[int, float] = {}
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()
        self.flops_per_batch = 0.0  # read by ThroughputMonitor for MFU

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.model.compile()

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss, token accuracy, number of label tokens)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        labels = batch["labels"]
        logits = out.logits.float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        mask = labels != IGNORE_INDEX
        with torch.no_grad():
            acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
        aux = getattr(out, "aux_loss", None)
        if aux is not None and self.hparams.router_aux_loss_coef:
            loss = loss + self.hparams.router_aux_loss_coef * aux
        return loss, acc, mask.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        seq_len = batch["input_ids"].shape[1]
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = flops_per_token(self.model, seq_len)
        self.flops_per_batch = self._flops_per_token[seq_len] * batch["input_ids"].numel()
        loss, acc, _ = self._loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step}; stopping before the optimizer step. "
                "checkpoints/last.ckpt holds the last good state: lower lr, check the data, or use a "
                "higher-precision setting, then resume=auto"
            )
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/acc", acc)
        self.log("lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, acc, n = self._loss(batch)
        self.val_loss.update(loss, weight=n)
        self.val_acc.update(acc, weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self.log("val/acc", self.val_acc.compute())
        self.val_loss.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        cfg = self.hparams.optim
        groups = param_groups(self.model, cfg["weight_decay"], cfg["decay_embeddings"])
        optimizer = instantiate(cfg["optimizer"], _partial_=True)(groups)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set max_steps or max_epochs: the cosine schedule needs a total number of steps")
        peak = cfg["optimizer"]["lr"]
        scheduler = warmup_cosine(optimizer, cfg["warmup_steps"], int(total), cfg["min_lr"] / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
