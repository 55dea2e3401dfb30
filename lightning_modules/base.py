"""What every training objective shares: the wrapped model, the optimizer and schedule, clipping, compile,
the non-finite loss and gradient guard that keeps every checkpoint good, and token-weighted losses over an
optimizer step."""

from __future__ import annotations

import math
import random

import lightning as L
import torch
from hydra.utils import instantiate
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel

from lightning_modules.optim import param_groups, warmup_cosine
from lmlab.core.adapters import is_quantized
from lmlab.core.models import compile_mode, flops_per_batch, flops_per_token
from lmlab.core.runs import resume_advice

SHARDED_KEY = "lmlab_sharded"  # a checkpoint's flag: written under trainer=fsdp (lmlab.train.sharding.check_resume)


def rng_states() -> dict:
    """This process's torch (CPU and every GPU) and Python random states, in types ``torch.load(weights_only=True)``
    reads (numpy's is left out: lmlab draws nothing from it while training)."""
    version, state, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "torch.cuda": cuda, "python": [version, list(state), gauss]}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class NonFiniteLossError(RuntimeError):
    """A NaN/inf training loss or gradient norm; raised on every rank at once, before any checkpoint is written
    after the bad step."""


class TrainingModule(L.LightningModule):
    """Base of LMModule, DPOModule and ClassifierModule: ``self.model`` is a transformers model, ``optim`` conf/optim.

    Non-finite losses and gradient norms are flagged on the device and checked at log steps and before every
    checkpoint, so there is no host sync per step and no checkpoint ever holds a bad state; a step whose
    gradient norm is not finite changes no weight to NaN (configure_gradient_clipping).
    """

    def __init__(self, model: PreTrainedModel, optim: dict, compile: bool | str = False):
        super().__init__()
        self.model = model
        self.optim = optim
        self.compile_model = compile
        self.flops_per_batch = 0.0  # read by ThroughputMonitor for MFU; set by _count_flops
        self._flops: dict[tuple, float] = {}  # batch shapes and images -> training FLOPs, see _count_flops
        self._new_non_finite_record(torch.device("cpu"))
        self._window_anchor: torch.Tensor | None = None  # see _token_weighted
        self._window_tokens: torch.Tensor | None = None
        # a 4-bit base (QLoRA) is loaded from init_from again on resume: its checkpoints hold what trains
        self.strict_loading = not is_quantized(model)

    def configure_model(self) -> None:
        if self.compile_model:
            self._compile(self.model)

    def _compile(self, module: torch.nn.Module) -> None:
        """torch.compile ``module`` in place, in the mode ``compile`` names (lmlab.core.models.compile_mode)."""
        module.compile(mode=compile_mode(self.compile_model))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Under compile, mark a packed batch's sizes dynamic (every dimension of more than one element: the row's
        width, its number of samples in ``cu_seq_lens``). They change from batch to batch, and torch.compile would
        trace a graph specialized to the first batch's sizes, then a dynamic one at the second batch, and again at an
        epoch's short last batch once ``cu_seq_lens`` is read (packed_attention=varlen). Marked from the first batch,
        one graph serves every width under the mask (a CPU probe: 2 graphs -> 1 over 7 packed batches); under varlen
        the longest sample's length, a Python int the kernel takes, still costs a second graph at the second batch
        (3 -> 2 in a review's trace). Padded batches keep torch's default: a pretraining batch's shape never changes,
        and a static graph suits it."""
        if self.compile_model and "document_lengths" in batch:
            for value in batch.values():
                if torch.is_tensor(value):
                    for dim in (d for d, size in enumerate(value.shape) if size > 1):
                        torch._dynamo.maybe_mark_dynamic(value, dim)
        return batch

    def _new_non_finite_record(self, device: torch.device) -> None:
        """The first non-finite step (-1: none yet) and its loss and gradient norm (-1: not computed yet); until there
        is one, the loss and norm are the current step's (_track_non_finite, _guard_gradients).

        Plain tensors on ``device``, not registered buffers: DDP copies rank 0's buffers to every rank before each
        forward, which wiped a flag that another rank had raised after the last log step, and that step went
        unreported."""
        self.first_bad_step = torch.tensor(-1, device=device)
        self.bad_loss = torch.tensor(0.0, device=device)
        self.bad_grad_norm = torch.tensor(-1.0, device=device)

    def on_train_start(self) -> None:
        self._new_non_finite_record(self.device)  # where the losses are; module.to() moves no plain tensor

    def _count_flops(
        self, batch: dict[str, torch.Tensor], factor: float = 1.0, encoder_rows: int | None = None
    ) -> None:
        """Set flops_per_batch (read by ThroughputMonitor for MFU) to the batch's training FLOPs, ``factor`` times for
        extra passes (DPO's live reference: 4/3).

        lmlab.core.models.flops_per_batch counts them, frozen parameters included (forward only), once
        per batch shape: counting parameters every step would cost time, so what trains is fixed
        before the first step (LMModule's ``freeze``, ClassifierModule's ``trainable``). A vision-language
        batch's images (``pixel_values``, one row per image) are passed on as ``images``: its tower and
        projector run per image, which the token shapes do not tell; the cache is keyed on them too.
        ``encoder_rows``: lmlab.core.models.flops_per_batch's (DPO's encoder-decoder batches encode half their rows).
        """
        images = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        if "document_lengths" in batch:  # packed: the attention term grows with each sample's length, not the row's
            if images:  # _packed_flops counts tokens only; datamodules/vision.py never packs
                raise ValueError("a packed batch with images: stage=vlm batches are padded, not packed")
            self.flops_per_batch = self._packed_flops(batch["input_ids"].numel(), batch["document_lengths"]) * factor
            return
        shapes = (tuple(batch["input_ids"].shape), tuple(batch["labels"].shape))
        key = (*shapes, images, encoder_rows)
        if key not in self._flops:
            self._flops[key] = flops_per_batch(self.model, *shapes, images=images, encoder_rows=encoder_rows)
        self.flops_per_batch = self._flops[key] * factor

    def _packed_flops(self, tokens: int, lengths: list[int]) -> float:
        """A packed row's training FLOPs: flops_per_token(L) = a + b*L, so samples of lengths L_i in a row of
        ``tokens`` (its padding tail included) cost a*tokens + b*sum(L_i**2); a and b are counted once."""
        if "packed" not in self._flops:
            a = flops_per_token(self.model, 0)
            self._flops["packed"] = (a, flops_per_token(self.model, 1) - a)
        a, b = self._flops["packed"]
        return a * tokens + b * sum(length * length for length in lengths)

    def _track_non_finite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is NaN/inf, on the device (no host sync); called for every
        micro-batch, before its backward."""
        loss = loss.detach().float()
        current = self.first_bad_step < 0  # no bad step yet: the record follows this step
        self.bad_loss = torch.where(current, loss, self.bad_loss)
        self.bad_grad_norm = torch.where(current, -1.0, self.bad_grad_norm)
        self.first_bad_step = torch.where(current & ~torch.isfinite(loss), self.global_step, self.first_bad_step)

    def _is_log_step(self) -> bool:
        """Whether this step is one in ``log_every_n_steps``, where a host sync is affordable."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def _on_log_step(self) -> bool:
        """The work of a logging step: stop on a non-finite loss or gradient norm flagged since the last one and log
        the lr. Returns whether this step is one: the objectives log their training metrics only there. Lightning
        writes training metrics at log steps alone anyway, and each ``self.log`` costs host time at every call (it
        walks the stored metric to move it to the value's device: ~1.4 ms a call on a 2-core CPU).

        No training metric is logged with ``prog_bar=True``: Lightning reads every such value back to the host at the
        end of every batch (``.item()``, a host sync that drains the GPU's queue), log step or not, because it keeps
        the last logged value. lmlab.train.callbacks.ProgressBar shows them, read once per log step."""
        if not self._is_log_step():
            return False
        self._raise_if_non_finite()
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return True

    def _raise_if_non_finite(self) -> None:
        """Raise NonFiniteLossError if any rank flagged a step. Every rank gathers every rank's flag first (a
        collective: all ranks call this at the same step), so all of them raise together, naming the earliest bad
        step, and none is left waiting in a collective for a rank that has stopped (a hang)."""
        steps = self._gather(self.first_bad_step).tolist()  # a host sync: log steps and checkpoints only
        bad = [(step, rank) for rank, step in enumerate(steps) if step >= 0]
        if not bad:
            return
        values = self._gather(torch.stack([self.bad_loss, self.bad_grad_norm]))
        step, rank = min(bad)
        loss, norm = values[rank].tolist()
        what = "gradient norm" if math.isfinite(loss) else "loss"
        where = f" on rank {rank}" if len(steps) > 1 else ""
        norm_text = "not computed yet" if norm < 0 else f"{norm:.4g}"
        raise NonFiniteLossError(
            f"{what} is not finite (nan/inf) at step {step}{where} (loss {loss:.4g}, gradient norm {norm_text}); "
            f"stopping. No checkpoint is ever written after a bad step: {resume_advice(self.trainer.default_root_dir)}"
        )

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of every rank, stacked in rank order (a plain all_gather, as _global_sum)."""
        if self.trainer.world_size == 1:
            return x.unsqueeze(0)
        rows = [torch.empty_like(x) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(rows, x)
        return torch.stack(rows)

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place: a plain all_reduce (Lightning's reduce adds a barrier and a host
        sync)."""
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def _token_weighted(self, mean_loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate for a micro-batch whose ``mean_loss`` is a mean over its ``n_tokens`` label tokens.

        Lightning divides each micro-batch's loss by accumulate_grad_batches (A) and DDP averages
        the gradients of the W ranks, so plain per-micro-batch means give a mean of means in which
        the tokens of short batches weigh more. The step's gradient should be that of the summed
        token loss over every micro-batch of the window on every rank, divided by the window's
        label tokens N, which is only known after its last micro-batch. So each micro-batch
        returns its summed loss S x W / g, with g the label tokens of the window's first
        micro-batch over all ranks (a window constant, known at once), and on_before_optimizer_step
        multiplies the gradients by g x A / N: the gradient is then sum(grad S) / N exactly,
        for any number of micro-batches in the window (an epoch's last one may be short).
        With A = 1 the factor g / N is 1 and is skipped; on one device n_tokens / g is then
        exactly 1.0, so the loss and gradient are bit for bit the plain mean's. No host sync:
        under DDP, an all_reduce of a count at the window's first micro-batch and one at its step.
        """
        if self._window_anchor is None:  # the first micro-batch of this optimizer step
            self._window_anchor = self._global_sum(n_tokens.clone())
            self._window_tokens = n_tokens
        else:
            self._window_tokens = self._window_tokens + n_tokens
        return mean_loss * (n_tokens * self.trainer.world_size / self._window_anchor)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Finish _token_weighted's normalization: the gradients become the mean over the window's label tokens."""
        if self._window_anchor is None:  # this objective's loss is not token-weighted
            return
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate > 1:
            factor = self._window_anchor * accumulate / self._global_sum(self._window_tokens.clone())
            torch._foreach_mul_([p.grad for p in self.parameters() if p.grad is not None], factor)
        self._window_anchor = self._window_tokens = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once (set to None). Lightning clears them only inside the
        next step's closure, after that step's forward, so the last step's gradients (fp32, the model's size: 0.92
        GiB for the 246M LLaMA) would sit in memory through every forward and raise its peak; Hugging Face's Trainer
        frees them right after the step. Micro-batches of one step (gradient accumulation) still add up: this runs
        once per optimizer step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_non_finite()
        checkpoint["rng_states"] = self._gather_objects(rng_states())
        # an FSDP run's optimizer state does not line up with an unsharded run's: lmlab.train.sharding.check_resume
        checkpoint[SHARDED_KEY] = isinstance(self.trainer.model, FullyShardedDataParallel)
        if not self.strict_loading:  # QLoRA: the frozen 4-bit base is init_from's, loaded again on resume
            trains = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {  # what trains, and the module's own state (a classifier's threshold)
                k: v for k, v in checkpoint["state_dict"].items() if k in trains or not k.startswith("model.")
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Each rank takes back its random state, so dropout (LoRA's, GPT-2's) draws the masks an uninterrupted run
        draws: Lightning restores no random state, and a resumed run with dropout ended on other weights."""
        states = checkpoint.get("rng_states")
        if states and len(states) != self.trainer.world_size:
            raise ValueError(
                f"the checkpoint was written by {len(states)} rank(s) and this run has {self.trainer.world_size}: "
                f"resume it with trainer.devices={len(states)} (each rank's data position and random state are its own)"
            )
        if states:
            set_rng_states(states[self.global_rank])

    def _gather_objects(self, obj) -> list:
        """``obj`` of every rank, in rank order (a collective: every rank saves a checkpoint's state together)."""
        if self.trainer.world_size == 1:
            return [obj]
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def on_train_end(self) -> None:
        self._raise_if_non_finite()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning would, but keep the total gradient norm, which guards and logs the step.

        Lightning calls this once per optimizer step, after the window's last backward, with gradient_clip_val or
        not, so this is where the norm is computed, once: by torch's clip_grad_norm_ when clipping by norm (it returns
        the norm before clipping), else by get_total_norm (foreach kernels). _guard_gradients then flags a
        non-finite norm and logs it. Under FSDP (trainer=fsdp) a rank's parameters are shards, whose norm alone
        would be guarded, logged and clipped by: the root's clip_grad_norm_ all-reduces the whole model's (by inf
        when not clipping by norm: the norm alone).
        Lightning itself would refuse to clip for an optimizer that unscales gradients itself (fused AdamW) under
        mixed precision, because fp16's GradScaler would hand it scaled gradients; bf16 has no scaler, so the
        gradients are the true ones and torch's clipping is exact. Under fp16's GradScaler, Lightning clips, and
        nothing is flagged: the scaler skips steps with inf gradients itself and lowers its scale.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        by_norm = bool(gradient_clip_val) and gradient_clip_algorithm != "value"
        root = self.trainer.model
        if isinstance(root, FullyShardedDataParallel):  # trainer=fsdp: this rank's params are shards of the model
            norm = root.clip_grad_norm_(gradient_clip_val if by_norm else math.inf)  # the norm all-reduced over them
        elif by_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if gradient_clip_val and not by_norm:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)  # element-wise: exact on shards too
        self._guard_gradients(optimizer, params, norm.float())

    def _guard_gradients(self, optimizer, params: list[torch.Tensor], norm: torch.Tensor) -> None:
        """Flag a non-finite gradient norm like a non-finite loss, keep that step from writing NaN into the weights,
        and log the norm at log steps; all on the device.

        A finite loss can still have inf gradients (an overflow in the backward pass): clipping then scales
        them by 0 or NaN and the optimizer writes NaN into the weights, which the next checkpoint would save.
        A fused optimizer (fused AdamW, trainer=gpu's) skips the whole step, weights, moments and step count,
        when its ``found_inf`` is 1: fp16's GradScaler uses the same switch, and it costs nothing. Any other
        optimizer gets zero gradients for the step, which keeps the weights and its state finite; a
        zero-gradient step still moves the weights by momentum and weight decay, but no checkpoint is ever
        written after a flagged step, so that state is never saved. Deciding on the host whether to step
        would need a sync at every step.
        """
        pending = (self.first_bad_step < 0) | (self.first_bad_step == self.global_step)
        self.bad_grad_norm = torch.where(pending, norm, self.bad_grad_norm)
        bad = ~torch.isfinite(norm)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), self.global_step, self.first_bad_step)
        if getattr(optimizer, "_step_supports_amp_scaling", False):  # torch's mark of a step that reads found_inf
            optimizer.found_inf = bad.float()
        else:
            for p in params:
                p.grad.masked_fill_(bad, 0.0)
        if self._is_log_step():
            self.log("train/grad_norm", norm)

    def configure_optimizers(self):
        cfg = self.optim
        groups = param_groups(self.model, cfg["weight_decay"], cfg["decay_embeddings"])
        settings = dict(cfg["optimizer"])
        if settings.get("fused") == "auto":  # conf/optim/adamw.yaml: fused kernels where the weights are on a GPU
            settings["fused"] = next(self.model.parameters()).is_cuda
        optimizer = instantiate(settings, _partial_=True)(groups)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set max_steps or max_epochs: the cosine schedule needs a total number of steps")
        peak = cfg["optimizer"]["lr"]
        scheduler = warmup_cosine(optimizer, cfg["warmup_steps"], int(total), cfg["min_lr"] / peak)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
