"""The non-finite guard (lightning_modules/base.py): an inf gradient norm under a finite loss stops the run like a
NaN loss, and no weight and no checkpoint ever holds NaN; under DDP every rank stops at the same step, whichever
rank went bad, instead of one raising while the others wait in a collective. Also the 2-rank CPU harness
(:func:`run_ranks`) that tests/test_dpo_reference.py uses."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_modules.base import NonFiniteLossError
from lightning_modules.lm import LMModule

OPTIM = {
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
    "weight_decay": 0.1,
    "decay_embeddings": False,
    "warmup_steps": 1,
    "min_lr": 1e-4,
}


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def batches(n: int = 32) -> DataLoader:
    """Rows of random tokens with pre-shifted labels (lmlab.core.collate's causal batches), 4 to a batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 9), generator=g)
    rows = [
        {"input_ids": row[:-1], "attention_mask": torch.ones(8, dtype=torch.long), "labels": row[1:]} for row in ids
    ]
    return DataLoader(rows, batch_size=4)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 6,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return L.Trainer(**settings)


class InfGradientAt(LMModule):
    """A finite loss whose gradients hold an inf at step ``bad_step`` (an overflow in the backward pass)."""

    def __init__(self, model, optim, bad_step: int):
        super().__init__(model, optim)
        self.bad_step = bad_step

    def on_after_backward(self) -> None:
        if self.global_step == self.bad_step:
            self.model.get_input_embeddings().weight.grad[5, 3] = math.inf


@pytest.mark.parametrize(
    ("clip", "fused"), [(1.0, False), (None, False), (1.0, True)], ids=["clip-by-norm", "no-clipping", "fused-adamw"]
)
def test_inf_gradients_under_a_finite_loss_stop_the_run_and_no_checkpoint_holds_nan(tmp_path, clip, fused):
    """Zeroed gradients (AdamW), or a skipped step (fused AdamW: the CPU has the fused kernel too)."""
    optim = {**OPTIM, "optimizer": {**OPTIM["optimizer"], "fused": fused}}
    module = InfGradientAt(tiny_lm(), optim, bad_step=3)
    every_step = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    run = trainer(
        tmp_path, gradient_clip_val=clip, log_every_n_steps=5, callbacks=[every_step], enable_checkpointing=True
    )
    message = r"gradient norm is not finite \(nan/inf\) at step 3 \(loss \d+\.\d+, gradient norm inf\)"
    with pytest.raises(NonFiniteLossError, match=message) as error:
        run.fit(module, train_dataloaders=batches())
    assert f"{tmp_path / 'checkpoints' / 'last.ckpt'} holds step 3 (the last good state)" in str(error.value)
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name
    # the bad step changed no weight to NaN: the weights in memory stay finite too
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_grad_norm_is_logged_at_log_steps_as_clipping_computed_it(tmp_path, monkeypatch):
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norms.append(real_clip(*args, **kwargs))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    run = trainer(tmp_path, max_steps=4, gradient_clip_val=0.5, log_every_n_steps=2)
    run.fit(LMModule(tiny_lm(), OPTIM), train_dataloaders=batches())
    assert len(norms) == 4, "one norm per step, the one clipping computes"
    assert float(run.callback_metrics["train/grad_norm"]) == pytest.approx(float(norms[3]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: Path, worker: Callable, args: tuple) -> None:
    """One rank: joins the 2-rank gloo group as Lightning's strategy=ddp expects of processes launched
    from outside (torchrun's variables), runs ``worker(rank, *args)`` and saves what it returned or raised."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        result = {"returned": worker(rank, *args)}
    except Exception as e:  # the parent checks what each rank raised
        result = {"raised": type(e).__name__, "message": str(e)}
    torch.save(result, out_dir / f"rank{rank}.pt")


def run_ranks(worker: Callable, *args, out_dir: Path, timeout: float = 60) -> list[dict]:
    """``worker(rank, *args)`` on 2 CPU ranks (processes in a gloo group, Lightning's ``strategy="ddp"`` with
    ``devices=2``); per rank ``{"returned": ...}`` or ``{"raised": name, "message": ...}``. Fails the test when the
    ranks have not all finished within ``timeout`` seconds (a hang), and kills them. The ranks are forked, not
    spawned: a spawned one spends about 12 s of CPU here importing torch and Lightning again. (A fork is unsafe
    only once CUDA is initialized; these ranks stay on the CPU, with one torch thread each.)"""
    ranks = torch.multiprocessing.start_processes(
        _rank_main, args=(free_port(), out_dir, worker, args), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() > deadline:
                unfinished = [rank for rank in range(2) if not (out_dir / f"rank{rank}.pt").exists()]
                pytest.fail(f"ranks {unfinished} still running after {timeout} s (a hang)")
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def ddp_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return trainer(tmp_path, devices=2, strategy="ddp", **kwargs)


class NaNLossOnRank1(LMModule):
    """Rank 1's loss is NaN at step ``bad_step`` but its gradients stay finite, so only rank 1 flags the step."""

    def __init__(self, model, optim, bad_step: int):
        super().__init__(model, optim)
        self.bad_step = bad_step

    def _forward(self, batch, with_loss):
        out = super()._forward(batch, with_loss)
        if with_loss and self.global_rank == 1 and self.global_step == self.bad_step:
            out.loss = out.loss + math.nan  # d(loss + c)/dloss = 1: the backward pass is unchanged
        return out


def _fit_with_nan_loss_on_rank_1(rank: int, tmp_path: Path, bad_step: int) -> int:
    run = ddp_trainer(tmp_path, log_every_n_steps=2)  # log steps 1, 3, 5
    run.fit(NaNLossOnRank1(tiny_lm(), OPTIM, bad_step), train_dataloaders=batches())
    return run.global_step


@pytest.mark.parametrize("bad_step", [1, 0], ids=["at-a-log-step", "between-log-steps"])
def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, bad_step):
    """Old behaviour: rank 1 raised at its log step while rank 0 went on into the next all-reduce and waited
    there for rank 1 (a hang, or a gloo error once rank 1's process was gone). And a flag raised between log steps
    was lost: held in a registered buffer, it was overwritten by rank 0's at the next step's forward (DDP
    broadcasts buffers), so the run trained on past a NaN loss."""
    results = run_ranks(_fit_with_nan_loss_on_rank_1, tmp_path, bad_step, out_dir=tmp_path)
    for rank, result in enumerate(results):
        assert result.get("raised") == "NonFiniteLossError", (rank, result)
        message = f"loss is not finite (nan/inf) at step {bad_step} on rank 1 (loss nan"
        assert message in result["message"], (rank, result)
