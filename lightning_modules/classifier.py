"""Sequence classification on a causal backbone (transformers' *ForSequenceClassification).

The model is the library's own: the hidden state of the last non-pad token (which has seen the
whole text under the causal mask) feeds a linear ``score`` head, under left or right padding, so
the exported folder classifies identically with plain transformers. ``trainable`` says what
learns: ``head``, ``head+last_block`` (GPT2-SFT's choice: the last transformer block, the final
norm and the head) or ``all``. A model with LoRA adapters (peft=lora, lmlab.core.adapters) trains
its adapters and its head instead, whatever ``trainable`` says (:func:`set_trainable`).

A class-imbalanced task (SMS spam: 13% spam) is judged by the ham it wrongly flags, so a run can
name a ``positive`` class and a ``max_fpr``: at every validation the threshold on the positive
class's log-odds with the highest val recall whose val false-positive rate is at most ``max_fpr``
is chosen (``choose_threshold``), val and test are scored with it, and it is saved with the
weights (checkpoint buffer) and in the export's ``config.decision_threshold``, where predict.py
and eval.py read it back (``exported_threshold`` + ``decide``).

The module computes and logs; the files and images of a run (``confusion_{val,test}.csv`` and
``.png``, wandb's table and image) are lmlab.train.callbacks.ConfusionReport's, from the
matrices the module keeps in ``confusion``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import multiclass_confusion_matrix
from transformers import PretrainedConfig, PreTrainedModel

from lightning_modules.base import TrainingModule
from lmlab.core.adapters import is_adapted
from lmlab.core.collate import varlen_kwargs

log = logging.getLogger(__name__)

TRAINABLE = ("head", "head+last_block", "all")
THRESHOLD_KEY = "decision_threshold"  # the export's config.json entry: {label, log_odds, probability, max_fpr} or null


def check_policy(policy: str) -> None:
    """Refuse a ``stage.module.trainable`` that is none of :data:`TRAINABLE`, also where adapters leave it unused."""
    if policy not in TRAINABLE:
        raise ValueError(f"stage.module.trainable must be one of {TRAINABLE}, got {policy!r}")


def trainable_names(model: PreTrainedModel, policy: str) -> set[str]:
    """Names of the parameters that train under ``policy``.

    The head is everything outside the backbone (``model.base_model_prefix``); the last block is
    the last entry of the backbone's layer list; the final norm is what the backbone holds
    outside its layers and its embedding tables.
    """
    check_policy(policy)
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
    rest = {
        f"{prefix}.{name}"
        for name, p in backbone.named_parameters()
        if id(p) in last_block or (id(p) not in in_blocks and id(p) not in embeddings)
    }
    return head | rest


def set_trainable(model: PreTrainedModel, policy: str) -> None:
    """Freeze all but what ``policy`` trains (:func:`trainable_names`).

    A model with adapters keeps what peft set, whatever the policy: its adapters and its head (peft's
    ``modules_to_save`` copy). Whole blocks trained beside the adapters would make them pointless (``all`` is a full
    fine-tune), so the policy acts only without adapters, and its default (``head+last_block``) needs no override for
    ``peft=lora``.
    """
    if is_adapted(model):
        check_policy(policy)
        log.info(
            "with adapters, the adapters and the head train; stage.module.trainable=%s is for runs without them", policy
        )
        return
    keep = trainable_names(model, policy)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


def metric_set(num_classes: int) -> MetricCollection:
    """The confusion matrix (rows: true class), from which ``scalar_metrics`` derives every number."""
    return MetricCollection({"confusion": MulticlassConfusionMatrix(num_classes)})


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (torchmetrics' convention for an undefined precision or recall)."""
    return torch.where(den > 0, num / den, torch.zeros_like(num))  # 0 / 0 is nan, but not chosen


def scalar_metrics(values: dict[str, torch.Tensor], labels: Sequence[str]) -> dict[str, torch.Tensor]:
    """Named scalars from ``values["confusion"]`` (rows: true class, columns: predicted).

    acc, f1 (macro, over the classes present in labels or predictions), precision/<label>, recall/<label>,
    fpr/<label> (the other classes' examples predicted as it, over their count: for spam, the share of ham
    flagged), and the class-balanced numbers balanced_acc (the mean recall) and balanced_precision/<label>:
    what the same per-class rates give on a set with equally many examples of every class, as GPT2-SFT's
    undersampled test set had (the expectation over balanced subsets of this set, without sampling one).
    """
    confusion = values["confusion"].double()
    true, predicted, hits = confusion.sum(1), confusion.sum(0), confusion.diag()
    precision, recall = _ratio(hits, predicted), _ratio(hits, true)
    f1 = _ratio(2 * precision * recall, precision + recall)
    fpr = _ratio(predicted - hits, confusion.sum() - true)
    rates = confusion / true.clamp(min=1).unsqueeze(1)  # each true class's row as rates: every class weighs alike
    balanced_precision = _ratio(rates.diag(), rates.sum(0))
    present = (true + predicted) > 0
    named = {"acc": hits.sum() / confusion.sum(), "f1": f1[present].mean(), "balanced_acc": recall[true > 0].mean()}
    for i, label in enumerate(labels):
        named[f"precision/{label}"] = precision[i]
        named[f"recall/{label}"] = recall[i]
        named[f"fpr/{label}"] = fpr[i]
        named[f"balanced_precision/{label}"] = balanced_precision[i]
    return {name: value.float() for name, value in named.items()}


def positive_log_odds(logits: torch.Tensor, positive: int) -> torch.Tensor:
    """log P(positive) - log P(any other class) per row: the score the threshold is put on.

    Unlike a softmax probability it does not round to 1.0 for confident rows, so the scores of a
    well-trained model stay distinct and a threshold between them survives float32 and export.
    """
    logits = logits.float()
    others = torch.cat([logits[:, :positive], logits[:, positive + 1 :]], dim=-1)
    return logits[:, positive] - others.logsumexp(-1)


def choose_threshold(scores: torch.Tensor, is_positive: torch.Tensor, max_fpr: float) -> float:
    """The threshold with the highest recall on these scores whose false-positive rate is at most ``max_fpr``.

    A row is called positive when its score is >= the threshold. Recall and false-positive rate
    both fall as the threshold rises, so the rule picks the lowest threshold that leaves at most
    k = floor(max_fpr * negatives) negatives at or above it: above the (k+1)-th highest negative
    score, halfway to the next higher score of any row (a margin for unseen data that changes
    nothing here), or just above it when no row scores higher.
    """
    negatives = scores[~is_positive].sort(descending=True).values
    if not len(negatives):
        raise ValueError("choosing a threshold needs negative examples in the validation split")
    k = math.floor(max_fpr * len(negatives) + 1e-9)  # the + 1e-9: 0.29 * 100 is 28.999999999999996
    if k >= len(negatives):
        return float(scores.min())
    cut = negatives[k]
    above = scores[scores > cut]
    return float((cut + above.min()) / 2) if len(above) else float(torch.nextafter(cut, cut + 1))


def decide(logits: torch.Tensor, positive: int | None, threshold: float) -> torch.Tensor:
    """Class ids: the argmax, or with a ``positive`` class id, that class wherever its log-odds reach
    ``threshold`` and the argmax of the other classes elsewhere."""
    if positive is None:
        return logits.argmax(-1)
    others = logits.float().clone()
    others[:, positive] = -math.inf
    return torch.where(positive_log_odds(logits, positive) >= threshold, positive, others.argmax(-1))


def exported_threshold(config: PretrainedConfig) -> tuple[int | None, float]:
    """(positive class id, log-odds threshold) from a classifier's ``config.decision_threshold``;
    (None, 0.0), i.e. the argmax, where there is none (a run without ``positive`` or a foreign model)."""
    saved = getattr(config, THRESHOLD_KEY, None)
    if not saved:
        return None, 0.0
    return config.label2id[saved["label"]], float(saved["log_odds"])


def write_confusion(confusion: torch.Tensor, labels: Sequence[str], out: Path, title: str) -> tuple[Path, Path]:
    """The confusion matrix as ``<out>.csv`` (rows: true label, columns: predicted) and ``<out>.png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = confusion.tolist()
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *labels])
        writer.writerows([label, *row] for label, row in zip(labels, counts, strict=True))
    fig, ax = MulticlassConfusionMatrix(len(labels)).plot(val=confusion.cpu(), add_text=True, labels=list(labels))
    ax.set_title(title)
    fig.savefig(out.with_suffix(".png"), dpi=100, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    return out.with_suffix(".csv"), out.with_suffix(".png")


def _threshold_loaded(module: ClassifierModule, incompatible_keys: object) -> None:
    """load_state_dict's post hook (a plain function, so the module still pickles)."""
    module._export_threshold()


class ClassifierModule(TrainingModule):
    """Cross entropy over classes (with the datamodule's class weights under data.balance=class_weights);
    predictions by argmax, or by a threshold on ``positive``'s log-odds chosen on val (see the module doc)."""

    def __init__(
        self,
        model: PreTrainedModel,
        optim: dict,
        labels: Sequence[str],
        trainable: str,
        positive: str | None,
        max_fpr: float,
        compile: bool | str = False,
    ):
        super().__init__(model, optim, compile)
        self.save_hyperparameters(ignore=["model"])
        if model.config.num_labels != len(labels):
            raise ValueError(f"the model has {model.config.num_labels} classes but data.labels has {len(labels)}")
        if positive is not None and positive not in labels:
            raise ValueError(f"stage.module.positive={positive!r} is not one of data.labels {list(labels)}")
        if not 0 <= max_fpr < 1:
            raise ValueError(f"stage.module.max_fpr must be in [0, 1), got {max_fpr}")
        self.labels = list(labels)
        self.positive = None if positive is None else self.labels.index(positive)
        self.max_fpr = max_fpr
        set_trainable(model, trainable)
        splits = ("val", "test")
        self.logits = torch.nn.ModuleDict({split: CatMetric(nan_strategy="disable") for split in splits})
        self.targets = torch.nn.ModuleDict({split: CatMetric(nan_strategy="disable") for split in splits})
        self.losses = torch.nn.ModuleDict({split: MeanMetric() for split in splits})
        self.register_buffer("class_weights", None, persistent=False)
        # in the checkpoint, so the best checkpoint is tested (and exported) with the threshold chosen with it;
        # loading a checkpoint's state dict (for test or export) puts its threshold into the model's config too
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_load_state_dict_post_hook(_threshold_loaded)
        # each split's confusion matrix (rows: true class) at its last epoch end, sanity check included: what
        # lmlab.train.callbacks.ConfusionReport writes to the run folder and wandb
        self.confusion: dict[str, torch.Tensor] = {}
        self._export_threshold()

    def setup(self, stage: str) -> None:
        weights = getattr(self.trainer.datamodule, "class_weights", lambda: None)()
        if weights is not None:
            self.class_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)

    def _export_threshold(self) -> None:
        """The current threshold into the model's config, which the hf/ export writes to config.json."""
        entry = None
        if self.positive is not None:
            t = float(self.threshold)
            entry = {
                "label": self.labels[self.positive],
                "log_odds": t,
                "probability": 1 / (1 + math.exp(-t)),
                "max_fpr": self.max_fpr,
            }
        setattr(self.model.config, THRESHOLD_KEY, entry)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits [texts, classes]. A padded batch: the model's own, pooled at each row's last real token. A
        packed one (datamodules/classification.PackedClassificationCollator: ``position_ids`` isolate the texts):
        the head applied to the final hidden state at each text's ``pool_positions``, where the padded batch pools
        (the model's own pooling would take one token per row). All the layers' hidden states are returned for that;
        training keeps them for the backward anyway, evaluation holds them for the step."""
        if "document_lengths" not in batch:
            return self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
        out = self.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            output_hidden_states=True,
            use_cache=False,
            **varlen_kwargs(batch),
        )
        return self.model.score(out.hidden_states[-1][0, batch["pool_positions"]])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._count_flops(batch)
        logits = self(batch)
        loss = self._loss(logits, batch["labels"])
        self._track_non_finite(loss)
        if self._on_log_step():
            self.log("train/loss", loss)
            self.log("train/acc", (logits.argmax(-1) == batch["labels"]).float().mean())  # this batch's, as before
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        """Keeps the logits: the val threshold can only be chosen once the whole split is scored."""
        logits = self(batch)
        self.losses[split].update(self._loss(logits, batch["labels"]), weight=len(batch["labels"]))
        # a copy: the metric keeps it, and a CUDA graph (compile=reduce-overhead) reuses its outputs' memory
        self.logits[split].update(logits.detach().to(torch.float32, copy=True))
        self.targets[split].update(batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, split: str) -> None:
        """Choose the threshold (val), then log loss, accuracy, macro F1, per-class precision/recall/FPR and the
        class-balanced numbers; keep the confusion matrix in ``self.confusion[split]``."""
        logits, labels = self.logits[split].compute(), self.targets[split].compute().long()
        if split == "val" and self.positive is not None:
            if not self.trainer.sanity_checking and sum(self.trainer.num_val_batches) < len(
                self.trainer.val_dataloaders
            ):
                rank_zero_warn(
                    f"the threshold is chosen on {sum(self.trainer.num_val_batches)} of the "
                    f"{len(self.trainer.val_dataloaders)} val batches: set trainer.limit_val_batches=1.0"
                )
            scores = positive_log_odds(logits, self.positive)
            self.threshold.fill_(choose_threshold(scores, labels == self.positive, self.max_fpr))
            self._export_threshold()
            self.log("val/threshold", self.threshold)
        confusion = multiclass_confusion_matrix(
            decide(logits, self.positive, float(self.threshold)), labels, len(self.labels)
        )
        self.log(f"{split}/loss", self.losses[split].compute(), prog_bar=True)
        for name, value in scalar_metrics({"confusion": confusion}, self.labels).items():
            self.log(f"{split}/{name}", value, prog_bar=name == "acc")
        for metric in (self.logits[split], self.targets[split], self.losses[split]):
            metric.reset()
        self.confusion[split] = confusion
