"""MFU (issue 15, item 1): conf/callbacks/default.yaml's peak table knows the common training GPUs by their dense bf16
peaks, ``callbacks.throughput.peak_flops`` overrides it, and every stage logs MFU against the peak in use."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from train import train

# torch.cuda.get_device_name() of each GPU -> its dense bf16 tensor peak in FLOP/s (NVIDIA datasheets, no sparsity)
DENSE_BF16 = {
    "NVIDIA H200": 9.89e14,
    "NVIDIA H200 NVL": 8.35e14,
    "NVIDIA H100 80GB HBM3": 9.89e14,
    "NVIDIA H100 PCIe": 7.56e14,
    "NVIDIA H100 NVL": 8.35e14,
    "NVIDIA B200": 2.25e15,
    "NVIDIA A100-SXM4-80GB": 3.12e14,
    "NVIDIA A100 80GB PCIe": 3.12e14,
    "NVIDIA L40S": 3.62e14,
    "NVIDIA L40": 1.81e14,
    "NVIDIA L4": 1.21e14,
    "NVIDIA A10G": 7.0e13,
    "NVIDIA A10": 1.25e14,
    "NVIDIA GeForce RTX 4090": 1.652e14,
    "NVIDIA GeForce RTX 3090": 7.1e13,
}


@pytest.mark.parametrize(("name", "peak"), DENSE_BF16.items(), ids=list(DENSE_BF16))
def test_the_peak_table_knows_each_gpu_by_its_dense_bf16_peak(tmp_path, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monitor = instantiate(compose_cfg(tmp_path, []).callbacks.throughput)
    gpu = torch.device("cuda", 0)
    assert monitor.table_peak(gpu, "bf16-mixed") == peak
    assert monitor.table_peak(gpu, "bf16-true") == peak
    assert monitor.table_peak(gpu, "32-true") is None, "fp32 runs keep Lightning's tf32 peaks"
    assert monitor.table_peak(torch.device("cpu"), "bf16-mixed") is None


STAGES = {
    "pretrain": [],
    "t5-pretrain": ["model=t5-tiny"],
    "sft": ["stage=sft"],
    "dpo": ["stage=dpo"],
    "classify": ["stage=classify"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_logs_mfu_against_the_configured_peak(tmp_path, stage):
    """On the CPU (no table entry) a configured peak gives MFU = the logged FLOP/s over it, for every objective."""
    overrides = [
        *STAGES[stage],
        "max_steps=4",
        "trainer.log_every_n_steps=1",
        "callbacks.throughput.window_size=2",
        "callbacks.throughput.peak_flops=1e9",
        "callbacks.samples.num_prompts=0",
    ]
    train(compose_cfg(tmp_path, overrides))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/mfu")]
    assert len(rows) >= 2, "MFU is logged at every log step once the window holds two"
    for row in rows:
        flops, mfu = float(row["train/device/flops_per_sec"]), float(row["train/device/mfu"])
        assert flops > 0 and mfu == pytest.approx(flops / 1e9)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_timed_at_log_steps_only_and_every_batch_counts(tmp_path, monkeypatch, accumulate):
    """Timing waits for the GPU, so it happens at log steps (3 of 9 steps here), after their last micro-batch, not
    each step; the batches between count in the next timing: the logged sample counts are every sample trained on."""
    from lightning.pytorch.trainer.states import RunningStage

    from lmlab.train.callbacks import TokenThroughputMonitor

    timed = []
    time_them = TokenThroughputMonitor._time

    def spy(self, trainer, stage):
        timed.append(stage)
        time_them(self, trainer, stage)

    monkeypatch.setattr(TokenThroughputMonitor, "_time", spy)
    overrides = [
        "max_steps=9",
        "trainer.log_every_n_steps=3",
        "trainer.limit_val_batches=0",
        f"trainer.accumulate_grad_batches={accumulate}",
    ]
    train(compose_cfg(tmp_path, [*overrides, "callbacks.samples.num_prompts=0"]))
    assert timed == [RunningStage.TRAINING] * 3
    with open(tmp_path / "metrics.csv", newline="") as f:
        samples = [float(r["train/samples"]) for r in csv.DictReader(f) if r.get("train/samples")]
    assert samples == [24 * accumulate, 48 * accumulate, 72 * accumulate], "8 samples a micro-batch, log steps 3, 6, 9"
