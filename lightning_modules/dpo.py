"""Direct preference optimisation against a frozen reference, for causal and encoder-decoder policies.

Batches come from datamodules.preference: chosen and rejected answers as one concatenated batch
(first half chosen), so the policy and the reference each run once per step. A sequence's
log-probability is the sum over its response tokens (prompt and padding are -100).

The reference is never trained, never in the optimizer and never in a checkpoint. :func:`build_reference`
makes it, a frozen eval-mode copy of the starting weights or the weights of ``ref_from``, and train.py hands it
to :class:`DPOModule` (``reference_model=``), which keeps it outside its registered children. With
``reference: copy`` it runs next to the policy at every step. With ``reference: precomputed`` its log-probs
of every pair are computed once before training, or read from the cache next to the run (``ref_cache``), and
given to the datamodule, whose items and batches then carry them (``ref_chosen_logps``, ``ref_rejected_logps``,
TRL's columns); the reference model is then dropped, so it never sits on the GPU during training. A resumed
run rebuilds the copy from the same starting weights, or reloads the cache.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torchmetrics import MeanMetric
from transformers import AutoConfig, PreTrainedModel

from lightning_modules.base import TrainingModule
from lightning_modules.dpo_loss import (
    label_counts,
    masked_mean_logits,
    preference_loss,
    preference_metrics,
    rpo_nll,
    sequence_logps,
)
from lightning_modules.lm import causal_inputs, freeze_parameters, lm_forward
from lmlab.core.adapters import is_adapted
from lmlab.core.collate import IGNORE_INDEX, LABEL_POSITIONS, REF_LOGPS, packed_documents
from lmlab.core.files import write_atomically
from lmlab.core.losses import head_label_logps, label_logps
from lmlab.core.models import AlignedHead, auto_class, cast_frozen_linears, resolve_hf_dir

log = logging.getLogger(__name__)

REFERENCES = ("copy", "precomputed")
# model types whose logits are their base model's last hidden states times the LM head (read in transformers 5.x)
FUSED_HEAD_TYPES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
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


def _read_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The log-probs cached in ``path`` if they are of the pairs with this :func:`data_fingerprint`, else None."""
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached["data_sha256"] == fingerprint:  # the cache lives in the run folder: a resumed run reuses it
            log.info("reference log-probs: %s from %s", path.stem, path)
            return cached["logps"]
    return None


class AdaptersOff:
    """A policy with LoRA adapters (lmlab.core.adapters) as its own reference: the same model run with its adapters
    off, which is the starting model, as TRL does with peft; no second copy of the weights. It runs in the policy's
    mode (train: dropout is off there by default, ``disable_dropout``). Called like the model; moving or compiling it
    is the policy's business."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(**kwargs)

    def __getattr__(self, name: str):  # config, prepare_decoder_input_ids_from_labels: the policy's
        if name == "policy":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.policy, name)

    def to(self, *args, **kwargs) -> AdaptersOff:
        return self

    def compile(self, *args, **kwargs) -> None:
        pass


def build_reference(policy: PreTrainedModel, ref_from: str | None = None) -> PreTrainedModel | AdaptersOff:
    """DPO's reference model, frozen (no gradients) and in eval mode: a copy of ``policy`` (its starting weights),
    or the model saved in ``ref_from`` (an lmlab run or Hugging Face folder), which must share the policy's
    vocabulary; for a policy with adapters the policy itself with its adapters off (:class:`AdaptersOff`). train.py
    builds it and passes it to :class:`DPOModule` as ``reference_model``."""
    if not ref_from and is_adapted(policy):
        return AdaptersOff(policy)
    if ref_from:
        hf_dir = resolve_hf_dir(ref_from)
        reference = auto_class(AutoConfig.from_pretrained(str(hf_dir))).from_pretrained(str(hf_dir))
        if reference.get_input_embeddings().num_embeddings != policy.get_input_embeddings().num_embeddings:
            raise ValueError(f"ref_from={ref_from}: its vocabulary differs from the policy's")
    else:
        reference = copy.deepcopy(policy)
    reference.eval().requires_grad_(False)
    return reference


def halves(
    values: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(values [N, T], labels) of the chosen and of the rejected answers: the batch's halves of rows, or of a packed
    row's samples, where each half keeps the whole row and the other half's labels become -100."""
    documents = packed_documents(batch)
    if documents is None:
        return tuple(zip(values.chunk(2), batch["labels"].chunk(2), strict=True))
    index, n = documents
    chosen = index < n // 2
    labels = batch["labels"]
    return (values, labels.masked_fill(~chosen, IGNORE_INDEX)), (values, labels.masked_fill(chosen, IGNORE_INDEX))


def fused_head_refusal(model: PreTrainedModel | AdaptersOff) -> str | None:
    """Why ``model``'s answer log-probs cannot come from its base model's hidden states and its LM head's weight
    (answer_logps with ``fused``), or None when they can. Its logits must be exactly ``hidden @ weight.T``, which
    only a family's code tells (Granite divides them by ``logits_scaling``, Gemma 2 soft-caps them), so the families
    are the ones read for it (FUSED_HEAD_TYPES); T5, a vision-language model and any other form their logits."""
    if isinstance(model, AdaptersOff) or is_adapted(model):
        return "its LoRA adapters wrap the model's forward"
    if model.config.model_type not in FUSED_HEAD_TYPES:
        return f"its logits are not known to be its hidden states times its head ({model.config.model_type} models)"
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        return "its LM head has a bias"
    return None


def answer_logps(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    fused: bool,
    with_logit_sums: bool = False,
    compile: bool = False,
    chunk_elements: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) [N, T] of a preference batch (0 off the labels) and, ``with_logit_sums``, each position's logits
    summed over the vocabulary [N, T] (detached; else None).

    ``fused``: the base model's hidden states go through the LM head at the label positions only
    (lmlab.core.losses.head_label_logps), so the ``[N, T, vocab]`` logits are never formed, for the prompts
    (about half the positions of a DPO batch) least of all; fused_head_refusal says which models allow it. The
    positions come with the batch (PreferenceCollator); a batch from elsewhere has them counted here, which waits
    for the GPU. The head is padded as the run's ``align_lm_head`` made the model's (AlignedHead), else not. Otherwise
    from the model's logits (preference_logits). ``compile``: the log-probs' element-wise work compiled;
    ``chunk_elements``: logits per chunk (lmlab.core.losses.label_logps).
    """
    labels = batch["labels"]
    if fused:
        hidden = model.base_model(**causal_inputs(model, batch)).last_hidden_state
        head = model.get_output_embeddings()
        multiple = head.multiple if isinstance(head, AlignedHead) else None
        positions = batch.get(LABEL_POSITIONS)
        if positions is None:
            positions = labels.flatten().ne(IGNORE_INDEX).nonzero().squeeze(1)
        return head_label_logps(
            hidden, head.weight, labels, positions, with_logit_sums, chunk_elements, compile, multiple
        )
    logits = preference_logits(model, batch)
    sums = logits.detach().sum(-1, dtype=torch.float32) if with_logit_sums else None
    return label_logps(logits, labels, chunk_elements, compile), sums


def preference_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a preference batch (lmlab.core.collate.PreferenceCollator: chosen rows, then rejected rows).

    A causal model runs over every row (lightning_modules.lm.lm_forward). An encoder-decoder's two halves hold the
    same encoder input (the collator checks it), so its encoder runs on the first half only and both answers'
    decoder rows attend to that one encoding: the same logits and gradients as two encoder passes, at half the
    encoder's cost (T5: about a quarter of the step).
    """
    if not model.config.is_encoder_decoder:
        return lm_forward(model, batch, with_loss=False).logits
    half = batch["input_ids"].shape[0] // 2
    mask = batch["attention_mask"]
    encoded = model.get_encoder()(input_ids=batch["input_ids"][:half], attention_mask=mask[:half]).last_hidden_state
    return model(
        encoder_outputs=(encoded.repeat(2, 1, 1),),
        attention_mask=mask,
        decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
        use_cache=False,
    ).logits


class DPOModule(TrainingModule):
    """DPO (``loss_type`` sigmoid | ipo | hinge, ``label_smoothing`` for conservative DPO) plus an
    optional SFT term on the chosen answers (``rpo_alpha``, RPO). Metrics use TRL's names. ``disable_dropout``
    (default, as TRL) trains the policy without dropout, like its eval-mode reference.

    ``reference_model`` is the frozen reference (:func:`build_reference`; train.py passes it). Without one the
    module makes the default, a copy of the starting weights, as TRL's DPOTrainer does for ``ref_model=None``; a
    ``ref_from`` reference has to be passed in. ``ref_from`` itself is kept in the hyperparameters as the
    record of where the reference came from. With ``reference: precomputed``, :meth:`setup` gives the
    datamodule the reference's log-probs (``add_reference_logps``) before any loader is built. ``fused_lm_head``
    computes the answers' log-probs from hidden states at the label positions, never forming the logits
    (answer_logps), for every model that allows it (fused_head_refusal; the others, T5 among them, form the logits).
    """

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
        compile: bool | str = False,
        disable_dropout: bool = True,
        fused_lm_head: bool = False,
        logps_chunk_elements: int = 2**26,
        reference_model: PreTrainedModel | None = None,
    ):
        super().__init__(model, optim, compile)
        self.save_hyperparameters(ignore=["model", "reference_model"])
        self.frozen = freeze_parameters(model, list(freeze))
        if disable_dropout:
            disable_dropout_in_model(model)
        if reference not in REFERENCES:
            raise ValueError(f"stage.module.reference={reference!r}: choose one of {REFERENCES}")
        if reference == "precomputed" and not ref_cache:
            raise ValueError("stage.module.reference=precomputed needs stage.module.ref_cache (a folder)")
        if reference_model is None:
            if ref_from:
                raise ValueError(
                    f"ref_from={ref_from}: pass the reference as reference_model=build_reference(model, ref_from) "
                    "(train.py does)"
                )
            reference_model = build_reference(model)
        self.fused_policy = fused_lm_head and self._fuses(model, "policy")
        self.fused_reference = fused_lm_head and self._fuses(reference_model, "reference")
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in METRICS})
        # A list, not an attribute: a registered child would land in state_dict, parameters() and DDP.
        self._reference = [reference_model]

    @staticmethod
    def _fuses(model: PreTrainedModel | AdaptersOff, role: str) -> bool:
        refusal = fused_head_refusal(model)
        if refusal:
            log.info("fused_lm_head: the %s forms its logits: %s", role, refusal)
        return refusal is None

    @property
    def reference(self) -> PreTrainedModel | None:
        """The frozen reference model; None once its precomputed log-probs are with the datamodule."""
        return self._reference[0] if self._reference else None

    def setup(self, stage: str) -> None:
        """reference=precomputed: once, before any loader is built (so also for a plain trainer.validate()), the
        datamodule's pairs get the reference's log-probs, and the reference model is freed."""
        if self.hparams.reference != "precomputed" or self.reference is None:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "add_reference_logps"):
            raise TypeError(
                "stage.module.reference=precomputed needs a datamodule that takes the reference's log-probs "
                f"(add_reference_logps, e.g. datamodules.preference.PreferenceDataModule), not {type(datamodule)}"
            )
        batch_dtype = self.trainer.precision_plugin.convert_input(torch.zeros(1)).dtype  # *-true casts batches
        if torch.finfo(batch_dtype).eps > torch.finfo(torch.float32).eps:
            log.warning("trainer.precision casts batches to %s: the reference log-probs lose digits", batch_dtype)
        datamodule.add_reference_logps(self._precomputed_logps)
        self._reference.clear()  # the reference's job is done: free its memory
        torch.cuda.empty_cache()

    def configure_model(self) -> None:
        """``compile`` compiles the live reference with the policy: uncompiled, its forward-only pass cost ~61% of a
        compiled policy step on an H100, where a third is its share (issue 15). A precomputed one is gone by now.
        A model whose head is fused runs its base model (answer_logps), so that is what is compiled."""
        if not self.compile_model:
            return
        for model, fused in ((self.model, self.fused_policy), (self.reference, self.fused_reference)):
            if model is not None:
                self._compile(model.base_model if fused else model)

    def on_fit_start(self) -> None:
        self._reference_to_device()

    def on_validation_start(self) -> None:  # also for a plain trainer.validate()
        self._reference_to_device()

    def _reference_to_device(self) -> None:
        if self.reference is not None:
            self._place_reference(self.device)

    def _place_reference(self, device: torch.device) -> None:
        """The reference on ``device``, its linear layers stored first in the dtype the trainer's precision runs a
        forward under (lmlab.core.models.cast_frozen_linears: the same log-probs from less memory; none without
        autocast). An injected reference is changed in place. A policy with its adapters off (LoRA) is the policy
        itself, so it stays as it is."""
        if isinstance(self.reference, PreTrainedModel):
            with self.trainer.precision_plugin.forward_context():
                dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            try:
                saved = cast_frozen_linears(self.reference, dtype)
            except ValueError as e:
                raise ValueError(f"DPO reference: {e}") from e
            if saved:
                log.info(
                    "reference: linear layers stored in %s, as autocast runs them: %.2f GiB less", dtype, saved / 2**30
                )
        self.reference.to(device)

    def _precomputed_logps(self, split: str, dataset, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The reference's log-probs [n, 2] (chosen, rejected) of every pair of ``split``, in ``dataset``'s order
        (``batches``): from ``ref_cache`` when it holds exactly these pairs, else computed and cached there.

        Under DDP every rank holds the whole split. Rank 0 alone reads the cache and broadcasts what it found (the
        log-probs or None), so all ranks take the same path and none waits in a collective the others skip; a
        broadcast, rather than every rank reading the file, also works where the run folder is not shared by every
        node. Without a usable cache the ranks share the work (:meth:`_computed_logps`): had rank 0 computed the
        whole split alone, the others would idle in a collective, on a large split past the process group's timeout
        (30 min for NCCL), which kills the run. Rank 0 alone writes the cache, so no two ranks rename files over it.
        A single process runs no collective.
        """
        strategy = self.trainer.strategy
        path = Path(self.hparams.ref_cache) / f"{split}.pt"
        fingerprint = logps = None
        if strategy.is_global_zero:
            fingerprint = data_fingerprint(dataset)
            logps = _read_cache(path, fingerprint)
        if strategy.world_size > 1:
            logps = strategy.broadcast(logps, src=0)
        if logps is not None:
            return logps
        logps = self._computed_logps(batches, strategy.global_rank, strategy.world_size)
        if strategy.is_global_zero:
            write_atomically(path, lambda f: torch.save({"logps": logps, "data_sha256": fingerprint}, f))
            log.info("reference log-probs: %d %s pairs computed, cached in %s", len(dataset), split, path)
        return logps

    @torch.no_grad()
    def _computed_logps(self, batches: Iterable[dict[str, torch.Tensor]], rank: int, world_size: int) -> torch.Tensor:
        """The reference's log-probs [n, 2] of all ``batches``, in their order; this rank runs the reference on the
        batches i with i % world_size == rank, and the ranks gather their pieces ([rows, 2] CPU tensors, small), so
        each spends 1/world_size of the pass and they all finish about together."""
        device = self.trainer.strategy.root_device  # setup() runs before the module is moved there
        self._place_reference(device)
        pieces = []
        with self.trainer.precision_plugin.forward_context():
            for i, batch in itertools.islice(enumerate(batches), rank, None, world_size):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # packed: lengths
                chosen, rejected = self._logps(self.reference, batch)[0].chunk(2)
                pieces.append((i, torch.stack([chosen, rejected], dim=1).float()))
        pieces = [(i, rows.cpu()) for i, rows in pieces]  # after the loop: no device sync per batch
        pieces = sorted((piece for ranks in self._gather_objects(pieces) for piece in ranks), key=lambda p: p[0])
        return torch.cat([rows for _, rows in pieces]) if pieces else torch.zeros(0, 2)

    def _logps(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], with_logit_sums: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-probs of every row [2B], answer_logps' logit sums) of ``model``, the policy or the reference; per-token
        averages for IPO, as TRL."""
        fused = self.fused_policy if model is self.model else self.fused_reference
        chunk = self.hparams.logps_chunk_elements
        token_logps, logit_sums = answer_logps(model, batch, fused, with_logit_sums, bool(self.compile_model), chunk)
        average = self.hparams.loss_type == "ipo"
        return sequence_logps(token_logps, batch["labels"], average, packed_documents(batch)), logit_sums

    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (chosen, rejected) log-probs: carried by the batch when precomputed, else computed."""
        if REF_LOGPS[0] in batch:
            return batch[REF_LOGPS[0]], batch[REF_LOGPS[1]]
        if self.reference is None:
            raise RuntimeError(
                "reference=precomputed, but the batch carries no ref_chosen_logps: its datamodule never got the "
                "reference log-probs (setup() gives them to trainer.datamodule)"
            )
        with torch.no_grad():
            return self._logps(self.reference, batch)[0].chunk(2)

    def _step(self, batch: dict[str, torch.Tensor], with_metrics: bool) -> tuple[torch.Tensor, dict]:
        """The loss, and (``with_metrics``: they cost a pass over the logits, if formed) TRL's metrics.

        The reference runs first, as in TRL: its logits (if formed) are freed before the policy's exist, which autograd
        keeps until the backward. In the other order both were alive at once, one more ``[2B, T, vocab]`` tensor at
        the peak."""
        ref_chosen, ref_rejected = self._reference_logps(batch)
        policy, logit_sums = self._logps(self.model, batch, with_metrics)
        policy_chosen, policy_rejected = policy.chunk(2)
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
        if self.hparams.rpo_alpha:  # the SFT term: per-token NLL of the chosen answers (IPO's logps are per token)
            counts = label_counts(batch["labels"], packed_documents(batch)).chunk(2)[0]
            loss = loss + self.hparams.rpo_alpha * rpo_nll(
                policy_chosen, torch.ones_like(counts) if self.hparams.loss_type == "ipo" else counts
            )
        if not with_metrics:
            return loss, {}
        (sums_chosen, labels_chosen), (sums_rejected, labels_rejected) = halves(logit_sums, batch)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        with torch.no_grad():
            metrics = preference_metrics(
                chosen_rewards,
                rejected_rewards,
                policy_chosen.detach(),
                policy_rejected.detach(),
                masked_mean_logits(sums_chosen, labels_chosen, vocab_size),
                masked_mean_logits(sums_rejected, labels_rejected, vocab_size),
            )
        return loss, metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        live_reference = self.hparams.reference == "copy"
        encoder_rows = batch["input_ids"].shape[0] // 2 if self.model.config.is_encoder_decoder else None
        self._count_flops(batch, 4 / 3 if live_reference else 1.0, encoder_rows)  # + the reference; one encoding
        if LABEL_POSITIONS in batch:  # a fused head skips the positions without a label
            head = self.model.get_output_embeddings().weight  # policy: 6 per weight (4 frozen), reference: 2
            passes = (6 if head.requires_grad else 4) * self.fused_policy + 2 * (
                live_reference and self.fused_reference
            )
            self.flops_per_batch -= (
                passes * head.numel() * (batch["input_ids"].numel() - batch[LABEL_POSITIONS].numel())
            )
        log_step = self._on_log_step()
        loss, metrics = self._step(batch, with_metrics=log_step)
        self._track_non_finite(loss)
        if log_step:
            self.log("train/loss", loss)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()})
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self._step(batch, with_metrics=True)
        pairs = len(batch.get("document_lengths", batch["labels"])) // 2  # packed: samples, not rows
        for name, value in {"loss": loss, **metrics}.items():
            self.val_metrics[name].update(value, weight=pairs)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=name == "loss")
            metric.reset()
