"""GPU path: bf16-mixed, fused AdamW, compile; tokens/s and MFU logged; a classifier in bf16. Skipped without CUDA."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_cfg

from train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("model, compile", [("llama-tiny", False), ("llama-tiny", True), ("t5-tiny", False)])
def test_gpu_run_learns_and_logs_throughput_and_mfu(tmp_path, model, compile):
    text = tmp_path / "rep.txt"
    text.write_text("\n".join(["the cat sat on the mat and the dog sat on the log."] * 400))
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "trainer=gpu",
            f"model={model}",
            f"compile={compile}",
            f"data.train_files=[{text}]",
            "max_steps=40",
            "lr=1e-2",
            "trainer.log_every_n_steps=1",
            "callbacks.throughput.window_size=5",
        ],
    )
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    tokens_per_sec = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    assert losses[-1] < losses[0] / 2
    assert tokens_per_sec and min(tokens_per_sec) > 0
    assert mfu and 0 < max(mfu) < 1


def test_gpu_classifier_learns_in_bf16(tmp_path):
    """stage=classify under bf16-mixed with fused AdamW: the bundled ham/spam messages, tested on the best
    checkpoint."""
    cfg = compose_cfg(
        tmp_path / "run",
        [
            "trainer=gpu",
            "stage=classify",
            "stage.module.trainable=all",
            "max_steps=60",
            "batch_size=16",
            "trainer.val_check_interval=20",
        ],
    )
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(next(r["test/acc"] for r in rows if r.get("test/acc"))) > 0.95
