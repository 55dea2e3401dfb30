"""No silent memorization: warnings before and while a run memorizes its training data, and summary.json.

A small model trained for many epochs over a small data set learns the data by heart: its
train loss keeps falling while its validation loss turns up. The guard says so at fit start
(the plan passes over the data too often), at each validation (the train/val gap keeps
widening while val/loss is above its best), and writes what the run saw at the end of fit
(tokens, epochs, tokens per parameter, the best validation value and the final gap).
"""

from __future__ import annotations

import json
import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lmlab.core.models import count_parameters

log = logging.getLogger(__name__)

TRAIN_LOSS, VAL_LOSS = "train/loss", "val/loss"  # logged by every objective (lightning_modules)


class MemorizationGuard(L.Callback):
    """Warns when a run is about to memorize, or does; writes the run summary to ``summary_path``.

    ``max_epochs_warning``: warn at fit start when the planned optimizer steps (times
    accumulate_grad_batches, over every rank) pass over the training data more often than
    this (null: never). ``gap_validations``: warn at a validation when val/loss - train/loss
    grew at each of the last this-many validations and val/loss is above its best (null:
    never); train/loss there is the mean of the values logged since the previous validation
    (read at log steps, where Lightning syncs with the host anyway). ``monitor`` and
    ``monitor_mode`` (the stage's) name the validation metric whose best the summary reports.

    Tokens seen are the non-pad input tokens (attention_mask; an encoder-decoder's encoder
    inputs), summed on the device and read at checkpoints and at the end. The counts survive resume
    through the callback's checkpoint state; under DDP that state is rank 0's, so a resumed
    run counts the tokens before the resume as rank 0's times the world size.
    """

    def __init__(
        self,
        summary_path: str,
        monitor: str,
        monitor_mode: str,
        max_epochs_warning: float | None,
        gap_validations: int | None,
    ):
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
        self.summary_path = Path(summary_path)
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.max_epochs_warning = max_epochs_warning
        self.gap_validations = gap_validations
        self.tokens_before = 0  # tokens counted before this process (resume)
        self.batches_seen = 0  # micro-batches of this rank
        self.validations: list[dict[str, Any]] = []  # per validation: step, train_loss, val_loss, monitor value
        self.train_losses: list[float] = []  # train/loss at the log steps since the last validation
        self.sampled_step = -1  # the step train/loss was last read at (once per step under gradient accumulation)
        self._tokens: torch.Tensor | None = None  # on the device, since this process started

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_before + int(self._tokens),
            "batches_seen": self.batches_seen,
            "validations": self.validations,
            "train_losses": self.train_losses,
            "sampled_step": self.sampled_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_before = state_dict["tokens_seen"]
        self.batches_seen = state_dict["batches_seen"]
        self.validations = state_dict["validations"]
        self.train_losses = state_dict["train_losses"]
        self.sampled_step = state_dict["sampled_step"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens = torch.zeros((), dtype=torch.long, device=pl_module.device)
        if trainer.is_global_zero:
            self._check_plan(trainer)

    def _check_plan(self, trainer: L.Trainer) -> None:
        """Log the planned passes over the training data; warn above max_epochs_warning."""
        steps = trainer.estimated_stepping_batches
        per_rank = trainer.num_training_batches  # micro-batches per epoch on each rank
        epochs = steps * trainer.accumulate_grad_batches / per_rank
        loader = trainer.train_dataloader
        plan = (
            f"{steps} steps x {trainer.accumulate_grad_batches} micro-batches x {loader.batch_size} samples x "
            f"{trainer.world_size} ranks = {epochs:.3g} epochs of the {len(loader.dataset)} training samples"
        )
        if self.max_epochs_warning is not None and epochs > self.max_epochs_warning:
            log.warning(
                "memorization: the plan is %s (more than max_epochs_warning=%s): after this many passes a "
                "model learns its data by heart; use more data or fewer steps, and watch val/loss",
                plan,
                self.max_epochs_warning,
            )
        else:
            log.info("plan: %s", plan)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
    ) -> None:
        # a packed batch (no padding, no mask) holds its samples' tokens and a padding tail
        self._tokens += sum(batch["document_lengths"]) if "document_lengths" in batch else batch["attention_mask"].sum()
        self.batches_seen += 1
        step = trainer.global_step
        if step % trainer.log_every_n_steps or step == self.sampled_step:  # read the loss at log steps only
            return
        loss = trainer.callback_metrics.get(TRAIN_LOSS)  # none before the first log step (gradient accumulation)
        if loss is not None:
            self.sampled_step = step
            self.train_losses.append(float(loss))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        train_loss = sum(self.train_losses) / len(self.train_losses) if self.train_losses else None  # None: no log step
        self.validations.append(
            {
                "step": trainer.global_step,
                "train_loss": train_loss,
                "val_loss": float(metrics[VAL_LOSS]),
                "monitor": float(metrics[self.monitor]),
            }
        )
        self.train_losses = []
        if trainer.is_global_zero:
            self._check_gap()

    def _check_gap(self) -> None:
        """Warn when the gap widened at each of the last gap_validations validations and val/loss is above its best."""
        if self.gap_validations is None:
            return
        recent = self.validations[-(self.gap_validations + 1) :]
        if len(recent) <= self.gap_validations or any(v["train_loss"] is None for v in recent):
            return
        gaps = [v["val_loss"] - v["train_loss"] for v in recent]
        best = min(self.validations, key=lambda v: v["val_loss"])
        if all(b > a for a, b in pairwise(gaps)) and recent[-1]["val_loss"] > best["val_loss"]:
            log.warning(
                "memorization: the val/loss - train/loss gap widened at each of the last %d validations (%s) "
                "and val/loss %.4f is above its best %.4f (step %d): the model is learning its training data "
                "by heart; stop earlier (callbacks.early_stopping.patience), or use more data or a smaller "
                "model",
                self.gap_validations,
                " -> ".join(f"{g:.3f}" for g in gaps),
                recent[-1]["val_loss"],
                best["val_loss"],
                best["step"],
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokens = int(trainer.strategy.reduce(self._tokens + self.tokens_before, reduce_op="sum"))
        if trainer.is_global_zero:
            summary = self.summary(trainer, pl_module, tokens)
            self.summary_path.parent.mkdir(parents=True, exist_ok=True)
            self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            log.info("run summary (%s): %s", self.summary_path, json.dumps(summary))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule, tokens: int) -> dict[str, Any]:
        """What the run saw and how it ended: the contents of summary.json."""
        parameters = count_parameters(pl_module.model)
        pick = min if self.monitor_mode == "min" else max
        best = pick(self.validations, key=lambda v: v["monitor"]) if self.validations else None
        final = self.validations[-1] if self.validations else None
        gap = final["val_loss"] - final["train_loss"] if final and final["train_loss"] is not None else None
        return {
            "steps": trainer.global_step,
            "tokens_seen": tokens,
            "epochs_seen": self.batches_seen / trainer.num_training_batches,
            "parameters": parameters,
            "trainable_parameters": count_parameters(pl_module.model, trainable_only=True),
            "tokens_per_parameter": tokens / parameters,
            "best": {"metric": self.monitor, "value": best["monitor"], "step": best["step"]} if best else None,
            "final": {
                "step": final["step"],
                "train_loss": final["train_loss"],
                "val_loss": final["val_loss"],
                "gap": gap,
            }
            if final
            else None,
        }
