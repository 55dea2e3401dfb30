"""Callbacks and logger glue: generations (and ROUGE) at validation, a classifier's confusion matrices, tokens/s in
the bar, an appending metrics.csv, early stopping that conf can switch off."""

from __future__ import annotations

import csv
import io
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_modules.classifier import ClassifierModule, write_confusion
from lmlab.core.files import write_atomically
from lmlab.core.models import sixteen_bit
from lmlab.eval.rouge import ROUGE_TYPES, rouge_scores
from lmlab.infer.generation import generate_texts
from lmlab.train.checkpoint_io import validation_follows


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


def _samples(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a batch: its rows, or a packed row's samples (lmlab.core.collate.pack's ``document_lengths``)."""
    return len(batch["document_lengths"]) if "document_lengths" in batch else batch["input_ids"].shape[0]


def early_stopping(patience: int | None, **kwargs: Any) -> EarlyStopping | None:
    """Lightning's EarlyStopping, or None (train.py drops it) when ``patience`` is null.

    So conf/callbacks shows the knob, off by default, instead of a callback users must know to add.
    """
    return None if patience is None else EarlyStopping(patience=patience, **kwargs)


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting tokens: logs train|device/items_per_sec (tokens/s) and MFU.

    MFU divides by the device's peak: ``peak_flops`` when set, else for a bf16/fp16 run the first entry of
    ``peak_bf16_flops`` (dense tensor-core FLOP/s from the datasheets, conf/callbacks/default.yaml) whose name the
    device's contains, else Lightning's own table. Lightning's alone printed no MFU on an H200 (it knows only the
    "SXM1"/"NVL1" names, and those and the H100 NVL at their sparse peaks, twice the dense ones) and takes an L40S
    for an L4. Validation reports tokens/s but no MFU: the FLOPs counted are a training step's.
    """

    def __init__(self, window_size: int, peak_flops: float | None, peak_bf16_flops: dict[str, float], **kwargs: Any):
        super().__init__(batch_size_fn=_samples, length_fn=_tokens, window_size=window_size, **kwargs)
        self.peak_flops = peak_flops
        self.peak_bf16_flops = dict(peak_bf16_flops)
        self._untimed: dict[RunningStage, tuple[int, float]] = {}  # batches and FLOPs counted since the last timing

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops or self.table_peak(trainer.strategy.root_device, trainer.precision)
        if peak:
            for throughput in self._throughputs.values():
                throughput.available_flops = peak

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        self._untimed[trainer.state.stage] = (0, 0.0)

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        """Lightning's, except that a training step is timed only where its metrics are logged (and before a
        validation), since timing waits for the GPU (torch.cuda.synchronize): Lightning's own timed every step, a
        host sync per step that stalls the queue of kernels. The steps between count in the next timing, so
        ``window_size`` is in timings, not batches."""
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._lengths[stage] += self.length_fn(batch)
        batches, flops = self._untimed[stage]
        self._untimed[stage] = (batches + 1, flops + pl_module.flops_per_batch)
        logged = trainer._logger_connector.should_update_logs and not trainer.fit_loop._should_accumulate()
        if stage != RunningStage.TRAINING or logged:  # a log step's last micro-batch: the optimizer step is done
            self._time(trainer, stage)

    def _time(self, trainer: L.Trainer, stage: RunningStage) -> None:
        """Add the batches counted since the last timing to ``stage``'s window, timed now."""
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        batches, flops = self._untimed[stage]
        self._batches[stage] += batches
        self._untimed[stage] = (0, 0.0)
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=flops if stage == RunningStage.TRAINING else None,  # pl_module counts training FLOPs (no MFU)
        )

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Time the training steps since the last log step first: Lightning takes training's last timing as the end
        of training when it leaves the validation's time out of training's."""
        if not trainer.sanity_checking and self._untimed.get(RunningStage.TRAINING, (0, 0.0))[0]:
            self._time(trainer, RunningStage.TRAINING)
        super().on_validation_start(trainer, *args)

    def table_peak(self, device: torch.device, precision: str) -> float | None:
        """``peak_bf16_flops``' entry for a CUDA device training in bf16/fp16 (mixed or true), else None."""
        if device.type != "cuda" or not sixteen_bit(precision):
            return None
        name = torch.cuda.get_device_name(device).lower()
        return next((peak for chip, peak in self.peak_bf16_flops.items() if chip in name), None)


class ProgressBar(TQDMProgressBar):
    """tqdm bar with the training ``metrics`` named in conf (e.g. train/loss, lr), tokens/s from the throughput
    monitor, and what validation logs with prog_bar.

    The training metrics are not logged with prog_bar=True: Lightning reads a prog_bar value back to the host at the
    end of every batch, which waits for the GPU to finish its queue, a host sync per step. This bar reads them itself
    at the end of each log step's last batch (every trainer.log_every_n_steps optimizer steps, where lmlab waits for
    the GPU anyway) and shows those values until the next one; its refreshes (every ``refresh_rate`` batches of an
    epoch) only show them.
    """

    def __init__(self, refresh_rate: int, metrics: list[str]):
        super().__init__(refresh_rate=refresh_rate)
        self.metrics = list(metrics)
        self._shown: dict[str, str] = {}
        self._read_at: int | None = None  # the optimizer step whose values _shown holds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.is_enabled and step and step % trainer.log_every_n_steps == 0 and step != self._read_at:
            self._read(trainer)
        super().on_train_batch_end(trainer, pl_module, *args)

    def _read(self, trainer: L.Trainer) -> None:
        self._read_at = trainer.global_step
        logged = trainer.callback_metrics
        self._shown = {name: f"{float(logged[name]):.4g}" for name in self.metrics if name in logged}
        for key, value in trainer.logged_metrics.items():
            if key.startswith("train") and key.endswith("items_per_sec"):
                self._shown["tok/s"] = f"{float(value):,.0f}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {**metrics, **self._shown}


class SampleGenerations(L.Callback):
    """Generations for fixed validation prompts at each validation, appended to samples.jsonl; ROUGE against references.

    Watching these is how a collapsing or degenerate model shows itself early. Where the data
    have reference answers (SFT, summaries), ROUGE-1/2/L F1 of the generations is logged as
    val/rouge1, val/rouge2, val/rougeL and written with its segmentation to rouge.jsonl.
    """

    def __init__(self, path: str, num_prompts: int, batch_size: int, rouge: str | None, generation: dict[str, Any]):
        self.path = Path(path)
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.rouge = rouge
        self.generation = dict(generation)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.num_prompts:
            return
        dm = trainer.datamodule
        pairs = dm.sample_pairs(self.num_prompts)
        if not pairs:  # data without prompts (a classifier's texts): nothing to generate
            return
        prompts, images = [p for p, _ in pairs], dm.sample_images(len(pairs))  # images: a vision-language model's
        # eager, also under compile: a decoding step's shapes change with every token, and each would be a graph
        # compiled (or, under compile=reduce-overhead, a CUDA graph recorded) for a few forward passes
        with torch.compiler.set_stance("force_eager"):
            outputs = generate_texts(
                pl_module.model, dm.tokenizer, prompts, self.generation, self.batch_size, images=images
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for (prompt, reference), output in zip(pairs, outputs, strict=True):
                record = {"step": trainer.global_step, "prompt": prompt, "output": output, "reference": reference}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        scored = [(o, r) for o, (_, r) in zip(outputs, pairs, strict=True) if r is not None]
        if self.rouge and scored:
            scores = rouge_scores([o for o, _ in scored], [r for _, r in scored], self.rouge)
            for name in ROUGE_TYPES:
                pl_module.log(f"val/{name}", scores[name], rank_zero_only=True)
            with open(self.path.parent / "rouge.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": trainer.global_step, **scores}) + "\n")


class ConfusionReport(L.Callback):
    """A classifier's confusion matrices: ``<out_dir>/confusion_{val,test}.csv`` and ``.png`` at each validation (but
    the sanity check) and test, and a table and an image per split in wandb.

    It reads what ClassifierModule scored (``confusion[split]``, ``labels``); under any other
    module (the language-model stages) it does nothing. It writes at on_{validation,test}_end
    because Lightning calls the callbacks' epoch-end hooks before the module's, which computes
    the matrix.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if not isinstance(pl_module, ClassifierModule) or trainer.sanity_checking or not trainer.is_global_zero:
            return
        confusion, labels = pl_module.confusion.get(split), pl_module.labels
        if confusion is None:
            return
        when = "best checkpoint" if split == "test" else f"step {trainer.global_step}"
        title = f"{split} ({when}): accuracy {float(confusion.diag().sum() / confusion.sum()):.4f}"
        _, png = write_confusion(confusion, labels, self.out_dir / f"confusion_{split}", title)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[label, *row] for label, row in zip(labels, confusion.tolist(), strict=True)]
                logger.log_table(f"{split}/confusion_matrix", columns=["true", *labels], data=rows)
                logger.log_image(f"{split}/confusion_matrix_png", images=[str(png)])


class Preemption(Checkpoint):
    """On SIGTERM, SIGINT (Ctrl+C) or SIGUSR1 (SLURM's warning before a kill): finish the current optimizer step (and
    its validation, if one follows it), write ``checkpoint`` (last.ckpt, where ``resume=auto`` continues) and exit with
    128 + the signal's number, as a killed process would, so a scheduler requeues the job and a ``&&`` chain stops.

    Saved before a validation that follows the step, the checkpoint would make the resumed run skip it (Lightning
    counts a validation at the checkpoint's step as done), so the save waits for the validation's end, after the best
    checkpoint's (a Checkpoint subclass: Lightning runs those last, in conf/callbacks/default.yaml's order). A signal
    during a validation is acted on at its end. Lightning's own SIGTERM handling stops at a step boundary but saves
    nothing and exits 0. The handlers are installed when training starts; Lightning's teardown restores the ones from
    before the run.

    Under DDP the ranks agree on whether any of them got a signal (:meth:`_received_on_any_rank`), which is a
    collective and waits for the GPU, so they do it every ``check_every_n_steps`` optimizer steps, at each
    validation's end and when training ends, not at every step: a signal then stops the run at most that many steps
    later. Lightning's own per-step SIGTERM broadcast (the same wait, at every step) is switched off while this
    callback handles SIGTERM, since its handler replaces Lightning's; a SIGTERM that Lightning's handler noted before
    (during the sanity check) is taken over when training starts.
    """

    def __init__(self, checkpoint: str, signals: list[str], check_every_n_steps: int = 1):
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps}: must be 1 or more")
        self.checkpoint = checkpoint
        self.signals = [signal.Signals[name] for name in signals]
        self.check_every_n_steps = check_every_n_steps
        self.received: signal.Signals | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in self.signals:
            signal.signal(signum, self._note)
        if signal.SIGTERM in self.signals:
            if trainer.received_sigterm:  # Lightning's handler got it: this callback acts on it, not Lightning
                self.received = self.received or signal.SIGTERM
                trainer._signal_connector.received_sigterm = False
            if trainer.world_size > 1:
                self._drop_lightnings_sigterm_broadcast(trainer)

    @staticmethod
    def _drop_lightnings_sigterm_broadcast(trainer: L.Trainer) -> None:
        """Lightning 2.6's training loop broadcasts its SIGTERM flag from rank 0 and reads it back before every batch
        under DDP (``_broadcast_sigterm_tensor``), a wait for the GPU at every step; with this callback's SIGTERM
        handler in place of Lightning's, the flag stays False. A Lightning without that method is left as it is."""
        loop = trainer.fit_loop.epoch_loop
        if callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
            loop._broadcast_sigterm_tensor = lambda: None
        else:
            logging.getLogger("lmlab.train").warning(
                "callbacks.preemption: this Lightning has no per-step SIGTERM broadcast to switch off"
            )

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        if trainer.world_size > 1 and trainer.global_step % self.check_every_n_steps:
            return
        if not validation_follows(trainer):  # else: on_validation_end
            self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A signal after the last check (under DDP, in the last ``check_every_n_steps`` steps) still saves and
        exits 128 + its number, rather than letting train.py go on to export and test."""
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        received = self._received_on_any_rank(trainer)
        if received is not None:
            self._save_and_exit(trainer, received)

    def _save_and_exit(self, trainer: L.Trainer, received: signal.Signals) -> None:
        trainer.save_checkpoint(self.checkpoint)
        logging.getLogger("lmlab.train").warning(
            "%s: saved %s at step %d; exiting with %d (rerun with resume=auto to continue)",
            received.name,
            self.checkpoint,
            trainer.global_step,
            128 + received,
        )
        raise SystemExit(128 + received)

    def _received_on_any_rank(self, trainer: L.Trainer) -> signal.Signals | None:
        """The signal this rank or any other received (the highest number where they differ), checked by every rank
        at the same points under DDP: a signal that reached one rank alone (a scheduler or a Ctrl+C that signals one
        process) sent that rank into the checkpoint's barrier while the others went on into the next step's
        all-reduce, a hang. One all-reduce of one number (and a host sync) per check; none on one device."""
        received = int(self.received or 0)
        if trainer.world_size > 1:
            flag = torch.tensor(received, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag)
        return signal.Signals(received) if received else None


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (a resumed run continues it) instead of deleting it, and rewrites it (for a new
    column, or rows dropped on resume) atomically: Lightning rewrites it in place, which a kill would cut off."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r") as f:
                header = f.readline().strip()
            self.metrics_keys = sorted(k for k in header.split(",") if k)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write(fieldnames, self._read()[1])

    def _read(self) -> tuple[list[str], list[dict[str, str]], int]:
        """metrics.csv's header, its whole rows, and how many rows a kill cut off (0 or 1): a last line without its
        line end, or with fewer fields than the header, is dropped rather than read as a row."""
        with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
            text = f.read()
        whole = text[: text.rfind("\n") + 1]  # up to the last line end
        reader = csv.DictReader(io.StringIO(whole, newline=""))
        rows = list(reader)
        complete = [row for row in rows if None not in row and None not in row.values()]
        return list(reader.fieldnames or []), complete, len(rows) - len(complete) + (whole != text)

    def _write(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        def write(f: io.BufferedIOBase) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            text.detach()  # flushes; write_atomically closes f

        write_atomically(self.metrics_file_path, write)

    def drop_rows_from(self, step: int) -> tuple[int, int]:
        """Drop the first row Lightning logged at a trainer step >= ``step``, every row after it, and a last row a
        kill cut off; returns how many of the first and of the second.

        Lightning logs at the trainer's step (such rows have an ``epoch``) the index of the optimizer step that is
        running, so a checkpoint at global step N precedes exactly the rows from the first with step >= N. Rows that
        callbacks log at their own counters (ThroughputMonitor's validate/*, no epoch) go with their neighbours."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0, 0
        fieldnames, rows, cut_off = self._read()
        cut = next((i for i, row in enumerate(rows) if row.get("epoch") and int(row["step"]) >= step), len(rows))
        if cut < len(rows) or cut_off:
            self._write(fieldnames, rows[:cut])
        return len(rows) - cut, cut_off


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``<run dir>/metrics.csv`` directly, appending on resume, where each step appears once
    (:meth:`resume_from`). Lightning writes the rows out after every ``log_metrics`` (its logger connector calls
    ``save``), so a kill loses none that a checkpoint covers."""

    def __init__(self, save_dir: str):
        super().__init__(save_dir=save_dir, name="", version="")

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_from(self, step: int) -> None:
        """Before a run resumes from its checkpoint at global step ``step``: drop the rows the interrupted run logged
        after that checkpoint, which the resumed run logs again, and a last row the kill cut off."""
        dropped, cut_off = self.experiment.drop_rows_from(step)
        log = logging.getLogger("lmlab.train")
        if dropped:
            log.info(
                "metrics.csv: dropped the %d rows logged after step %d, which the resumed run logs again", dropped, step
            )
        if cut_off:
            log.warning("metrics.csv: dropped its last row, which the kill cut off in the middle")


def import_wandb(tmp: Path) -> None:
    """Import wandb with Python's temporary folder set to ``tmp`` (the run's wandb/tmp) for the moment of import.

    On import wandb (0.31) makes two temporary folders, ``tmp*wandb-media`` (logged images and tables pass through
    it) and ``tmp*wandb-artifacts``, which only a clean exit removes: every killed run left two in $TMPDIR, where
    nothing tells a dead run's from a live one's. In the run folder they go with the run, and resuming it removes them
    (:func:`remove_leftovers`). Once wandb is imported (a sweep's later jobs in one process) there is nothing to do.
    """
    if "wandb" in sys.modules:
        return
    tmp.mkdir(parents=True, exist_ok=True)
    before, tempfile.tempdir = tempfile.tempdir, str(tmp)
    try:
        import wandb  # noqa: F401
    finally:
        tempfile.tempdir = before
