"""callbacks.preemption under DDP: a signal that reaches one rank alone stops every rank at the same step, each
saving nothing but the shared last.ckpt and exiting with 128 + the signal's number (the single-process SIGTERM run,
killed and resumed, is tests/test_export_resume.py's)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from test_nan_guard import OPTIM, batches, ddp_trainer, run_ranks, tiny_lm

from lightning_modules.lm import LMModule
from lmlab.train.callbacks import Preemption


class SignalRank1(L.Callback):
    """Sends SIGTERM to rank 1's own process during the forward of the step after ``step`` optimizer steps, as a
    scheduler signalling one process would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_with_sigterm_on_rank_1(rank: int, tmp_path: Path, check_every_n_steps: int, signal_step: int) -> dict:
    """The exit code and step of this rank, and how often the run called torch.distributed.broadcast (Lightning's
    per-step SIGTERM broadcast did, before each batch)."""
    last = tmp_path / "last.ckpt"
    preemption = Preemption(str(last), ["SIGTERM"], check_every_n_steps)  # a Checkpoint callback: checkpointing on
    callbacks = [preemption, SignalRank1(signal_step)]
    run = ddp_trainer(tmp_path, max_steps=6, callbacks=callbacks, enable_checkpointing=True)
    broadcasts = []
    broadcast = torch.distributed.broadcast

    def counted(*args, **kwargs):
        broadcasts.append(1)
        return broadcast(*args, **kwargs)

    torch.distributed.broadcast = counted
    try:
        run.fit(LMModule(tiny_lm(), OPTIM), train_dataloaders=batches())
    except SystemExit as exited:
        return {"exit": exited.code, "step": run.global_step, "broadcasts": len(broadcasts)}
    finally:
        torch.distributed.broadcast = broadcast
    return {"exit": None, "step": run.global_step, "broadcasts": len(broadcasts)}


@pytest.mark.parametrize(("check_every_n_steps", "signal_step", "stop"), [(1, 2, 3), (4, 2, 4), (4, 4, 6)])
def test_a_signal_on_one_rank_saves_and_stops_every_rank_at_the_same_step(
    tmp_path, check_every_n_steps, signal_step, stop
):
    """Old behaviour: rank 1 alone went into the checkpoint's barrier and rank 0 into step 3's all-reduce (a hang,
    or a gloo error once rank 1's process was gone). The ranks agree on a signal every ``check_every_n_steps``
    steps and when training ends: one sent during step 3 stops them after step 3, or at the check after step 4; one
    sent during step 5, after the last check of a 6-step run, at its end (it would have been lost). No per-step
    broadcast of Lightning's SIGTERM flag runs: the callback's handler replaces the one that sets it."""
    results = run_ranks(_fit_with_sigterm_on_rank_1, tmp_path, check_every_n_steps, signal_step, out_dir=tmp_path)
    expected = {"exit": 143, "step": stop, "broadcasts": 0}
    assert [result.get("returned") for result in results] == [expected] * 2, results
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == stop


def test_a_sigterm_that_lightning_noted_before_training_saves_and_exits_at_the_first_check(tmp_path):
    """A SIGTERM during the sanity check reaches Lightning's handler (this callback's is installed when training
    starts): the callback takes it over, so the run saves and exits 143 rather than Lightning stopping without a
    checkpoint and with exit code 0."""
    saved = []

    class Trainer:
        global_step, world_size, enable_validation = 1, 1, False
        received_sigterm = True
        _signal_connector = type("Connector", (), {"received_sigterm": True})()
        fit_loop = type("Loop", (), {"_should_accumulate": staticmethod(lambda: False)})()

        def save_checkpoint(self, path):
            saved.append(path)

    trainer = Trainer()
    guard = Preemption(str(tmp_path / "last.ckpt"), ["SIGTERM"])
    handlers = {signum: signal.getsignal(signum) for signum in guard.signals}
    try:
        guard.on_train_start(trainer, None)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert trainer._signal_connector.received_sigterm is False
    with pytest.raises(SystemExit) as stop:
        guard.on_train_batch_end(trainer)
    assert stop.value.code == 143 and saved == [str(tmp_path / "last.ckpt")]
