"""Direct preference optimisation against a frozen reference, for causal and encoder-decoder policies.

Batches come from datamodules.preference: chosen and rejected answers as one concatenated batch
(first half chosen), so the policy and the reference each run once per step. A sequence's
log-probability is the sum over its response tokens (prompt and padding are -100).

The reference is never trained, never in the optimizer and never in a checkpoint: it is either
a frozen eval-mode copy of the starting weights (``reference: copy``, or the weights of
``ref_from``), kept outside the module's registered children, or its log-probs computed once
before training and cached next to the run (``reference: precomputed``), after which the
reference model is dropped, so it never sits on the GPU during training. A resumed run
rebuilds the copy from the same starting weights, or reloads the cache.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from transformers import AutoConfig, PreTrainedModel

from lightning_modules.dpo_loss import (
    label_counts,
    masked_mean_logits,
    preference_loss,
    preference_metrics,
    rpo_nll,
    sequence_logps,
)
from lightning_modules.lm import LMModule, lm_forward
from lmlab.core.models import auto_class, resolve_hf_dir

log = logging.getLogger(__name__)

REFERENCES = ("copy", "precomputed")
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)  # TRL's names


def disable_dropout_in_model(model: torch.nn.Module) -> None:
    """Switch off every dropout of ``model`` (TRL's disable_dropout_in_model, which DPOTrainer applies by default).

    DPO compares the policy's log-probs with the reference's, which runs in eval mode: with dropout on, the
    policy's log-probs of even unchanged weights differ from the reference's by noise, which the loss then
    fits. Every ``nn.Dropout`` gets p=0, and so do the float dropout rates that attention modules copy from
    their config at construction and apply functionally (LlamaAttention/MixtralAttention.attention_dropout,
    T5Attention.dropout). ``model.config`` is left as configured, so the export and later stages keep it.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def data_fingerprint(dataset) -> str:
    """sha256 of every pair's token ids and labels, so a cache is only reused for exactly the same pairs."""
    h = hashlib.sha256()
    for item in dataset:
        for side in ("chosen", "rejected"):
            for key in ("input_ids", "labels"):
                h.update(item[side][key].numpy().tobytes())
    return h.hexdigest()


class DPOModule(LMModule):
    """DPO (``loss_type`` sigmoid | ipo | hinge, ``label_smoothing`` for conservative DPO) plus an
    optional SFT term on the chosen answers (``rpo_alpha``, RPO). Metrics use TRL's names. ``disable_dropout``
    (default, as TRL) trains the policy without dropout, like its eval-mode reference."""

    def __init__(
        self,
        model: PreTrainedModel,
        optim: dict,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float = 0.0,
        reference: str = "copy",
        ref_from: str | None = None,
        ref_cache: str | None = None,
        freeze: Sequence[str] = (),
        compile: bool = False,
        disable_dropout: bool = True,
    ):
        super().__init__(model, optim, freeze, compile)
        if disable_dropout:
            disable_dropout_in_model(model)
        if reference not in REFERENCES:
            raise ValueError(f"stage.module.reference={reference!r}: choose one of {REFERENCES}")
        if reference == "precomputed" and not ref_cache:
            raise ValueError("stage.module.reference=precomputed needs stage.module.ref_cache (a folder)")
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in METRICS})
        # A list, not an attribute: a registered child would land in state_dict, parameters() and DDP.
        self._reference = [self._load_reference(model, ref_from)]
        self.ref_logps: dict[str, torch.Tensor] = {}

    @staticmethod
    def _load_reference(policy: PreTrainedModel, ref_from: str | None) -> PreTrainedModel:
        if ref_from:
            hf_dir = resolve_hf_dir(ref_from)
            reference = auto_class(AutoConfig.from_pretrained(str(hf_dir))).from_pretrained(str(hf_dir))
            if reference.get_input_embeddings().num_embeddings != policy.get_input_embeddings().num_embeddings:
                raise ValueError(f"ref_from={ref_from}: its vocabulary differs from the policy's")
        else:
            reference = copy.deepcopy(policy)
        reference.eval().requires_grad_(False)
        return reference

    @property
    def reference(self) -> PreTrainedModel | None:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        self._prepare_reference()

    def on_validation_start(self) -> None:  # also for a plain trainer.validate()
        self._prepare_reference()

    def _prepare_reference(self) -> None:
        """Put the live reference on the device, or fill the precomputed log-probs once and free the model."""
        if self.hparams.reference == "copy":
            self.reference.to(self.device)
        elif not self.ref_logps:
            for split, dataset in (
                ("train", self.trainer.datamodule.train_set),
                ("val", self.trainer.datamodule.val_set),
            ):
                self.ref_logps[split] = self._precompute(split, dataset)
            self._reference.clear()  # the reference's job is done: free its memory
            torch.cuda.empty_cache()

    @torch.no_grad()
    def _precompute(self, split: str, dataset) -> torch.Tensor:
        """Reference log-probs [n, 2] (chosen, rejected) of every pair of ``split``, cached on disk."""
        path = Path(self.hparams.ref_cache) / f"{split}.pt"
        fingerprint = data_fingerprint(dataset)
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            if cached["data_sha256"] == fingerprint:  # the cache lives in the run folder: a resumed run reuses it
                log.info("reference log-probs: %s from %s", split, path)
                return cached["logps"].to(self.device)
        dm = self.trainer.datamodule
        self.reference.to(self.device)
        loader = DataLoader(dataset, batch_size=dm.batch_size, collate_fn=dm.collator())
        out = torch.zeros(len(dataset), 2, device=self.device)
        with self.trainer.precision_plugin.forward_context():
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                chosen, rejected = self._logps(self.reference, batch)[0].chunk(2)
                out[batch["index"]] = torch.stack([chosen, rejected], dim=1).float()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"logps": out.cpu(), "data_sha256": fingerprint}, tmp)
        tmp.replace(path)
        log.info("reference log-probs: %d %s pairs computed, cached in %s", len(dataset), split, path)
        return out

    def _logps(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of every row [2B], logits) of ``model``; per-token averages for IPO, as TRL."""
        logits = lm_forward(model, batch, with_loss=False).logits
        return sequence_logps(logits, batch["labels"], average=self.hparams.loss_type == "ipo"), logits

    def _reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.reference == "precomputed":
            ref = self.ref_logps[split][batch["index"]]
            return ref[:, 0], ref[:, 1]
        with torch.no_grad():
            return self._logps(self.reference, batch)[0].chunk(2)

    def _step(self, batch: dict[str, torch.Tensor], split: str, with_metrics: bool) -> tuple[torch.Tensor, dict]:
        """The loss, and (``with_metrics``: they cost a pass over the logits) TRL's metrics."""
        policy, logits = self._logps(self.model, batch)
        policy_chosen, policy_rejected = policy.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(batch, split)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            self.hparams.beta,
            self.hparams.loss_type,
            self.hparams.label_smoothing,
        )
        loss = losses.mean()
        labels_chosen, labels_rejected = batch["labels"].chunk(2)
        if self.hparams.rpo_alpha:  # the SFT term: per-token NLL of the chosen answers (IPO's logps are per token)
            counts = label_counts(labels_chosen)
            loss = loss + self.hparams.rpo_alpha * rpo_nll(
                policy_chosen, torch.ones_like(counts) if self.hparams.loss_type == "ipo" else counts
            )
        if not with_metrics:
            return loss, {}
        logits_chosen, logits_rejected = logits.detach().chunk(2)
        with torch.no_grad():
            metrics = preference_metrics(
                chosen_rewards,
                rejected_rewards,
                policy_chosen.detach(),
                policy_rejected.detach(),
                masked_mean_logits(logits_chosen, labels_chosen),
                masked_mean_logits(logits_rejected, labels_rejected),
            )
        return loss, metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        live_reference = self.hparams.reference == "copy"
        self._count_flops(batch, factor=4 / 3 if live_reference else 1.0)  # + one forward pass of the reference
        log_step = self._on_log_step()
        loss, metrics = self._step(batch, "train", with_metrics=log_step)
        self._track_non_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()})
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self._step(batch, "val", with_metrics=True)
        pairs = batch["index"].numel()
        for name, value in {"loss": loss, **metrics}.items():
            self.val_metrics[name].update(value, weight=pairs)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=name == "loss")
            metric.reset()
