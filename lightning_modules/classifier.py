"""Sequence classification on a causal backbone (transformers' *ForSequenceClassification).

The model is the library's own: the hidden state of the last non-pad token (which has seen the
whole text under the causal mask) feeds a linear ``score`` head, under left or right padding, so
the exported folder classifies identically with plain transformers. ``trainable`` says what
learns: ``head``, ``head+last_block`` (GPT2-SFT's choice: the last transformer block, the final
norm and the head) or ``all``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from transformers import PreTrainedModel

from lightning_modules.base import TrainingModule

TRAINABLE = ("head", "head+last_block", "all")


def trainable_names(model: PreTrainedModel, policy: str) -> set[str]:
    """Names of the parameters that train under ``policy``.

    The head is everything outside the backbone (``model.base_model_prefix``); the last block is
    the last entry of the backbone's layer list; the final norm is what the backbone holds
    outside its layers and its embedding tables.
    """
    if policy not in TRAINABLE:
        raise ValueError(f"stage.module.trainable must be one of {TRAINABLE}, got {policy!r}")
    names = {name for name, _ in model.named_parameters()}
    if policy == "all":
        return names
    prefix = model.base_model_prefix
    head = {name for name in names if not name.startswith(prefix + ".")}
    if policy == "head":
        return head
    backbone = getattr(model, prefix)
    blocks = next(m for m in backbone.children() if isinstance(m, torch.nn.ModuleList))
    last_block = {id(p) for p in blocks[-1].parameters()}
    in_blocks = {id(p) for p in blocks.parameters()}
    embeddings = {id(p) for m in backbone.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    rest = {f"{prefix}.{name}" for name, p in backbone.named_parameters()
            if id(p) in last_block or (id(p) not in in_blocks and id(p) not in embeddings)}
    return head | rest


def metric_set(num_classes: int) -> MetricCollection:
    """Accuracy, macro F1, per-class precision and recall, and the confusion matrix (rows: true class)."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "precision": MulticlassPrecision(num_classes, average=None),
        "recall": MulticlassRecall(num_classes, average=None),
        "confusion": MulticlassConfusionMatrix(num_classes),
    })


def scalar_metrics(values: dict[str, torch.Tensor], labels: Sequence[str]) -> dict[str, torch.Tensor]:
    """metric_set's results as named scalars: acc, f1, precision/<label>, recall/<label> (the confusion matrix aside)."""
    named = {"acc": values["acc"], "f1": values["f1"]}
    for i, label in enumerate(labels):
        named[f"precision/{label}"] = values["precision"][i]
        named[f"recall/{label}"] = values["recall"][i]
    return named


def write_confusion(confusion: torch.Tensor, labels: Sequence[str], out: Path, title: str) -> tuple[Path, Path]:
    """The confusion matrix as ``<out>.csv`` (rows: true label, columns: predicted) and ``<out>.png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = confusion.tolist()
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *labels])
        writer.writerows([label, *row] for label, row in zip(labels, counts))
    fig, ax = MulticlassConfusionMatrix(len(labels)).plot(val=confusion.cpu(), add_text=True, labels=list(labels))
    ax.set_title(title)
    fig.savefig(out.with_suffix(".png"), dpi=100, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    return out.with_suffix(".csv"), out.with_suffix(".png")


class ClassifierModule(TrainingModule):
    """Cross entropy over classes (with the datamodule's class weights under data.balance=class_weights)."""

    def __init__(self, model: PreTrainedModel, optim: dict, labels: Sequence[str], trainable: str,
                 report_dir: str, compile: bool = False):
        super().__init__(model, optim, compile)
        self.save_hyperparameters(ignore=["model"])
        if model.config.num_labels != len(labels):
            raise ValueError(f"the model has {model.config.num_labels} classes but data.labels has {len(labels)}")
        self.labels = list(labels)
        keep = trainable_names(model, trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        self.report_dir = Path(report_dir)
        self.metrics = torch.nn.ModuleDict({split: metric_set(len(labels)) for split in ("val", "test")})
        self.losses = torch.nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.train_acc = MulticlassAccuracy(len(labels), average="micro")
        self.register_buffer("class_weights", None, persistent=False)
        self._flops_per_token = 0.0

    def setup(self, stage: str) -> None:
        weights = getattr(self.trainer.datamodule, "class_weights", lambda: None)()
        if weights is not None:
            self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def _count_flops(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward over every parameter (2N per token), backward over the trainable ones (4N): an estimate.

        The per-token figure is counted once; each batch scales it by its own (padded) length.
        """
        if not self._flops_per_token:
            n_all = sum(p.numel() for p in self.model.parameters())
            n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self._flops_per_token = 2 * n_all + 4 * n_trainable
        self.flops_per_batch = batch["input_ids"].numel() * self._flops_per_token

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._count_flops(batch)
        logits = self(batch)
        loss = self._loss(logits, batch["labels"])
        self._track_non_finite(loss)
        self.train_acc(logits.argmax(-1), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc)
        self._is_log_step()
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch)
        self.losses[split].update(self._loss(logits, batch["labels"]), weight=len(batch["labels"]))
        self.metrics[split].update(logits.argmax(-1), batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _report(self, split: str) -> None:
        """Log loss, accuracy, macro F1, per-class precision/recall; write and log the confusion matrix."""
        values = self.metrics[split].compute()
        self.log(f"{split}/loss", self.losses[split].compute(), prog_bar=True)
        for name, value in scalar_metrics(values, self.labels).items():
            self.log(f"{split}/{name}", value, prog_bar=name == "acc")
        self.metrics[split].reset()
        self.losses[split].reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        when = "best checkpoint" if split == "test" else f"step {self.global_step}"
        title = f"{split} ({when}): accuracy {float(values['acc']):.4f}"
        _, png = write_confusion(values["confusion"], self.labels, self.report_dir / f"confusion_{split}", title)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[label, *row] for label, row in zip(self.labels, values["confusion"].tolist())]
                logger.log_table(f"{split}/confusion_matrix", columns=["true", *self.labels], data=rows)
                logger.log_image(f"{split}/confusion_matrix_png", images=[str(png)])
