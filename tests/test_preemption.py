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
    """Sends SIGTERM to rank 1's own process during step 2's forward, as a scheduler signalling one process would."""

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_with_sigterm_on_rank_1(rank: int, tmp_path: Path, check_every_n_steps: int) -> dict:
    """The exit code and step of this rank, and how often the run called torch.distributed.broadcast (Lightning's
    per-step SIGTERM broadcast did, before each batch)."""
    last = tmp_path / "last.ckpt"
    preemption = Preemption(str(last), ["SIGTERM"], check_every_n_steps)  # a Checkpoint callback: checkpointing on
    run = ddp_trainer(tmp_path, max_steps=6, callbacks=[preemption, SignalRank1()], enable_checkpointing=True)
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


@pytest.mark.parametrize(("check_every_n_steps", "stop"), [(1, 3), (4, 4)])
def test_a_signal_on_one_rank_saves_and_stops_every_rank_at_the_same_step(tmp_path, check_every_n_steps, stop):
    """Old behaviour: rank 1 alone went into the checkpoint's barrier and rank 0 into step 3's all-reduce (a hang,
    or a gloo error once rank 1's process was gone). The ranks agree on a signal every ``check_every_n_steps``
    steps: the one sent during step 3 (global_step 2) stops them after step 3, or at the check after step 4. No
    per-step broadcast of Lightning's SIGTERM flag runs: the callback's handler replaces the one that sets it."""
    results = run_ranks(_fit_with_sigterm_on_rank_1, tmp_path, check_every_n_steps, out_dir=tmp_path)
    expected = {"exit": 143, "step": stop, "broadcasts": 0}
    assert [result.get("returned") for result in results] == [expected] * 2, results
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == stop
