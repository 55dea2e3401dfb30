"""Callbacks and logger glue: generations at validation, tokens/s in the bar, an appending metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs train|device/items_per_sec (tokens/s) and MFU."""

    def __init__(self, window_size: int = 20, **kwargs: Any):
        super().__init__(batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=_tokens, window_size=window_size,
                         **kwargs)


class ProgressBar(TQDMProgressBar):
    """tqdm bar with loss and lr (logged with prog_bar) plus tokens/s from the throughput monitor."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for key, value in trainer.logged_metrics.items():
            if key.startswith("train") and key.endswith("items_per_sec"):
                metrics["tok/s"] = f"{float(value):,.0f}"
        return metrics


class SampleGenerations(L.Callback):
    """Greedy generations from fixed validation prompts, appended to samples.jsonl at each validation.

    Watching these is how a collapsing or degenerate model shows itself early.
    """

    def __init__(self, path: str, num_prompts: int = 3, max_new_tokens: int = 32):
        self.path = Path(path)
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.num_prompts:
            return
        dm = trainer.datamodule
        tokenizer = dm.tokenizer
        model = pl_module.model
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for prompt in dm.sample_prompts(self.num_prompts):
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(pl_module.device)
                out = model.generate(
                    **ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
                text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                record = {"step": trainer.global_step, "prompt": prompt, "output": text}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (a resumed run continues it) instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<run dir>/metrics.csv`` directly, appending on resume."""

    def __init__(self, save_dir: str):
        super().__init__(save_dir=save_dir, name="", version="")

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
