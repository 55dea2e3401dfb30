"""Checkpoint files that are either the old file or the whole new one, on any local filesystem.

Lightning's TorchCheckpointIO saves through an fsspec transaction: the bytes go to a temporary file in ``$TMPDIR``,
which is then moved over the target. When ``$TMPDIR`` is another filesystem (a tmpfs, a node-local disk) the move
is a copy into the truncated target, so a kill or a full disk mid-copy leaves a cut-off, unloadable last.ckpt
(issue 16). Here the temporary file lies beside its target, is fsynced, and replaces it with one rename.

Also the periodic last.ckpt callback, whose ``checkpoint_every`` says plainly when it is off and whose checkpoints keep
the validation of their step, and the best-checkpoint callback, whose restored state is what its folder holds.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmlab.core.files import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves go through :func:`lmlab.core.files.write_atomically` (remote URLs keep
    Lightning's own path). Set for every run in conf/trainer/cpu.yaml (``trainer.plugins``), which the GPU preset
    inherits."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda f: torch.save(checkpoint, f))


def periodic_checkpoint(checkpoint_every: int | None, **kwargs: Any) -> ModelCheckpoint | None:
    """Lightning's ModelCheckpoint writing every ``checkpoint_every`` optimizer steps (conf/callbacks/default.yaml
    ``last``: checkpoints/last.ckpt), or None, which train.py drops, for ``checkpoint_every=null``: off, with a
    warning, as a crash then loses every step (a signal still saves: callbacks.preemption). Zero or a negative number
    is an error: Lightning would take 0 as off without a word."""
    if checkpoint_every is None:
        logging.getLogger("lmlab.train").warning(
            "checkpoint_every=null: periodic checkpoints are off, so a crash loses the whole run "
            "(SIGTERM, SIGINT and SIGUSR1 still save last.ckpt)"
        )
        return None
    if checkpoint_every < 1:
        raise ValueError(
            f"checkpoint_every={checkpoint_every}: give the number of steps between checkpoints (>= 1), "
            "or null to turn periodic checkpoints off"
        )
    return PeriodicCheckpoint(every_n_train_steps=checkpoint_every, save_on_train_epoch_end=False, **kwargs)


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether the training loop validates right after this batch (its own test, which is not public)."""
    loop = trainer.fit_loop
    return trainer.enable_validation and loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every ``every_n_train_steps`` steps that, at a step followed by a validation, saves after it.

    Lightning saves at the end of the step's batch, before that step's validation, and a run resumed from such a
    checkpoint skips the validation (Lightning 2.6 counts it as done): with checkpoint_every a multiple of
    val_check_interval, as in every recipe, each resume lost a validation, its metrics and its chance at the best
    checkpoint. Saved after the validation, the checkpoint holds it, and a resume goes on with the next step. A
    kill during that validation resumes from the checkpoint before. Should the validation not run after all (no
    validation batches), the save happens at the next step's end.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():  # mid-window: a resumed run saved its step again there, without
            return  # the window's gradients
        if self._defer_save_until_validation:  # deferred, but no validation ran: save now
            self._defer_save_until_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        due = trainer.global_step % self._every_n_train_steps == 0 and not self._should_skip_saving_checkpoint(trainer)
        if due and validation_follows(trainer):
            self._defer_save_until_validation = True  # Lightning's on_validation_end saves then
            return
        super().on_train_batch_end(trainer, pl_module, *args)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (conf/callbacks/default.yaml ``best``) that, on resume, takes its state from its newest file.

    A validation may save a better ``best-step<N>.ckpt`` and delete the previous best after the last.ckpt that a
    resume restores (one of an earlier step, or a preemption's). The run then restored a state that names a deleted
    file and a worse score: the export crashed on the missing file, and later
    validations, judged against the stale score, could replace the true best with a worse one. Each file this
    callback saves holds the callback's state as of that save, so a file of it that the restored state does not
    know was written later, and the newest such file's state is the true one.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(self._newer_state(state_dict) or state_dict)

    def _newer_state(self, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        known = {str(Path(p)) for p in state_dict.get("best_k_models", {})}
        pattern = re.sub(r"\{[^}]*\}", "*", self.filename or "*") + self.FILE_EXTENSION
        newer = []
        for path in Path(self.dirpath).glob(pattern):
            if str(path) in known:
                continue
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # tensors are not read
            state = ckpt.get("callbacks", {}).get(self.state_key)
            if state is not None:
                newer.append((ckpt["global_step"], state))
        return max(newer, key=lambda found: found[0])[1] if newer else None
