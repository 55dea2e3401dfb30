"""Resuming says what it does and never makes things up (issue 16, items 4, 7 and 8): a bad last.ckpt falls back to
a good checkpoint, metrics.csv holds each step once, what a kill leaves is cleaned up, resume=<run dir> continues a
run with changed settings, and checkpoint_every and init_from refuse what they would silently get wrong."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose_cfg
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_nan_guard import OPTIM, batches, tiny_lm
from test_nan_guard import trainer as nan_guard_trainer
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_modules.lm import LMModule
from lmlab.core.models import preset_families
from lmlab.core.runs import resume_advice, resume_checkpoint
from lmlab.train.callbacks import RunCSVLogger
from train import train

# 6 steps, a checkpoint every 3, validation every 3, a metrics row every step, and every step's checkpoint kept
# (stepstep=<N>.ckpt), so a test can put the run back to any step as a kill would have left it. export=last: the
# copies' checkpoints name the best checkpoint by its path in the original folder.
RUN = [
    "max_steps=6",
    "export=last",
    "checkpoint_every=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.num_prompts=0",
    "+callbacks.every_step={_target_: lightning.pytorch.callbacks.ModelCheckpoint, dirpath: ${paths.output_dir}/"
    "checkpoints, filename: 'step{step}', every_n_train_steps: 1, save_top_k: -1}",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted run of RUN, with its config where Hydra would save it."""
    run = tmp_path_factory.mktemp("finished")
    cfg = compose_cfg(run, RUN)
    train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def killed_at(finished: Path, dest: Path, step: int) -> Path:
    """A copy of the finished run as a kill after step 6 with last.ckpt at ``step`` leaves it: metrics.csv has rows
    up to the kill, no export, and no checkpoint after ``step``."""
    shutil.copytree(finished, dest)
    shutil.rmtree(dest / "hf")
    checkpoints = dest / "checkpoints"
    shutil.copy(checkpoints / f"stepstep={step}.ckpt", checkpoints / "last.ckpt")
    for path in checkpoints.glob("*.ckpt"):
        if path.name.startswith("stepstep="):
            if int(path.stem.removeprefix("stepstep=")) > step:
                path.unlink()
        elif path.name != "last.ckpt":  # best-step6.ckpt
            path.unlink()
    return dest


def metric_cells(run: Path) -> Counter:
    """(step, metric) of every filled cell of metrics.csv, counted; without the rates (``*/device/*``), whose
    window of timings a resumed process starts anew, so it reports them from a later step."""
    with open(run / "metrics.csv", newline="") as f:
        return Counter(
            (row["step"], key)
            for row in csv.DictReader(f)
            for key, v in row.items()
            if v and key not in ("step", "epoch") and "/device/" not in key
        )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_resumed_metrics_hold_each_step_once(finished, tmp_path):
    """Killed after step 6 with last.ckpt at step 3: the rows of steps 4-6 were logged and are logged again."""
    run = killed_at(finished, tmp_path / "run", 3)
    train(compose_cfg(run, [*RUN, "resume=auto"]))
    cells = metric_cells(run)
    assert [cell for cell, n in cells.items() if n > 1] == [], "rows logged twice after the resume"
    assert cells == metric_cells(finished)


def test_an_empty_last_ckpt_falls_back_to_the_newest_good_checkpoint(finished, tmp_path, caplog):
    run = killed_at(finished, tmp_path / "run", 3)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    shutil.move(run / "checkpoints" / "stepstep=3.ckpt", run / "checkpoints" / "best-step3.ckpt")
    caplog.set_level(logging.INFO, logger="lmlab.train")
    train(compose_cfg(run, [*RUN, "resume=auto"]))
    assert "last.ckpt cannot be loaded (empty file (0 bytes)): resuming from best-step3.ckpt (step 3)" in caplog.text
    for name, weights in final_weights(finished).items():  # continued from step 3: the uninterrupted run's weights
        assert torch.equal(final_weights(run)[name], weights), name


def test_no_loadable_checkpoint_is_an_error_naming_each_file(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"")
    (checkpoints / "best-step3.ckpt").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(RuntimeError, match=r"no checkpoint .* loads \(last.ckpt: empty file .*; best-step3.ckpt: "):
        train(compose_cfg(tmp_path, ["resume=auto", "max_steps=1"]))


def test_resume_removes_what_the_kill_left(finished, tmp_path, caplog):
    """A checkpoint write cut off by the kill (write_atomically's temporary file) and wandb's temporary folders."""
    run = killed_at(finished, tmp_path / "run", 6)
    partial = run / "checkpoints" / ".last.ckpt.tmp4242"
    partial.write_bytes(b"half a checkpoint")
    media = run / "wandb" / "tmp" / "tmpab12cdwandb-media"
    media.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="lmlab.train")
    train(compose_cfg(run, [*RUN, "resume=auto"]))
    assert not partial.exists() and not media.exists()
    assert "removed what the interrupted run left: checkpoints/.last.ckpt.tmp4242, wandb/tmp/tmpab12cdwandb-media" in (
        caplog.text
    )


@pytest.mark.slow  # a fresh interpreter imports wandb
def test_wandb_keeps_its_temporary_folders_in_the_run(tmp_path):
    """wandb makes two folders in $TMPDIR when imported and removes them only at a clean exit; a killed run (here
    os._exit) left them behind on every kill. They now go into <run>/wandb/tmp."""
    tmpdir, run = tmp_path / "tmpdir", tmp_path / "run"
    tmpdir.mkdir()
    script = (
        "import os, pathlib; from lmlab.core.runs import WANDB_TMP; from lmlab.train.callbacks import import_wandb; "
        f"import_wandb(pathlib.Path({str(run)!r}) / WANDB_TMP); os._exit(0)"
    )
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, timeout=120)
    assert [p.name for p in tmpdir.iterdir() if "wandb" in p.name] == []
    assert sorted(p.name.split("wandb-")[-1] for p in (run / "wandb" / "tmp").iterdir()) == ["artifacts", "media"]


def test_resume_run_dir_continues_it_with_changed_settings(finished, tmp_path, caplog):
    """The advice after a NaN: lower lr, then resume=<run dir>; resume=auto would start afresh (another config)."""
    run = killed_at(finished, tmp_path / "run", 6)
    caplog.set_level(logging.INFO, logger="lmlab.train")
    train(compose_cfg(run, [*RUN, "lr=1e-3", "max_steps=8", f"resume={run}"]))
    assert f"resume={run}: resuming from step 6 (last.ckpt)" in caplog.text
    assert "(then -> now): lr: 0.003 -> 0.001; max_steps: 6 -> 8" in caplog.text
    cells = metric_cells(run)
    assert cells[("5", "train/loss")] == 1 and cells[("7", "train/loss")] == 1  # continued, not started again
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_resume_run_dir_without_a_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"resume={tmp_path}: no checkpoints/\\*.ckpt in {tmp_path}"):
        train(compose_cfg(tmp_path, [f"resume={tmp_path}", "max_steps=1"]))


def fake_checkpoint(run: Path, step: int) -> None:
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": step}, run / "checkpoints" / "last.ckpt")


def test_resume_auto_says_what_it_resumes(tmp_path, caplog):
    run = tmp_path / "2026-01-02_10-00-00_abcd1234"
    fake_checkpoint(run, 7)
    caplog.set_level(logging.INFO, logger="lmlab.train")
    assert resume_checkpoint(compose_cfg(run, ["resume=auto"]), run) == (run / "checkpoints" / "last.ckpt", 7)
    assert f"resume=auto: resuming {run} from step 7 (last.ckpt)" in caplog.text


def test_resume_auto_names_interrupted_runs_of_other_settings(tmp_path, caplog):
    other = tmp_path / "2026-01-01_10-00-00_deadbeef"
    fake_checkpoint(other, 5)
    (other / ".hydra").mkdir()
    OmegaConf.save(compose_cfg(other, ["lr=1e-3", "model=gpt2-tiny"]), other / ".hydra" / "config.yaml")
    new = tmp_path / "2026-01-02_10-00-00_abcd1234"
    caplog.set_level(logging.INFO, logger="lmlab.train")
    assert resume_checkpoint(compose_cfg(new, ["resume=auto"]), new) is None
    assert "resume=auto: no interrupted run of this config (id " in caplog.text
    assert (
        f"{other} (an interrupted run, last.ckpt at step 5) has other settings (then -> now): lr: 0.001 -> 0.003; "
        f"model: gpt2-tiny -> llama-tiny; resume={other} continues it with the current ones"
    ) in caplog.text


def test_resume_auto_names_a_run_whose_saved_config_cannot_be_read(tmp_path, caplog):
    """Another run's .hydra/config.yaml cut off by a kill: resume=auto only names that run, so it starts afresh
    (it stopped with the YAML error)."""
    other = tmp_path / "2026-01-01_10-00-00_deadbeef"
    fake_checkpoint(other, 5)
    (other / ".hydra").mkdir()
    (other / ".hydra" / "config.yaml").write_text("model:\n  name: [llama-tiny\n")
    new = tmp_path / "2026-01-02_10-00-00_abcd1234"
    caplog.set_level(logging.INFO, logger="lmlab.train")
    assert resume_checkpoint(compose_cfg(new, ["resume=auto"]), new) is None
    assert f"{other} (an interrupted run, last.ckpt at step 5) has other settings (then -> now): its " in caplog.text
    assert "config.yaml cannot be read (" in caplog.text


def test_resume_advice_is_true_to_the_run_folder(tmp_path):
    assert resume_advice(tmp_path).startswith(f"no checkpoint was saved before it ({tmp_path}/checkpoints/last.ckpt")
    fake_checkpoint(tmp_path, 40)
    advice = resume_advice(tmp_path)
    assert "last.ckpt holds step 40 (the last good state)" in advice and f"rerun with resume={tmp_path} " in advice


def test_checkpoint_every_zero_is_an_error_and_null_turns_checkpoints_off(tmp_path, caplog):
    with pytest.raises(Exception, match="checkpoint_every=0: give the number of steps"):
        instantiate(compose_cfg(tmp_path, ["checkpoint_every=0"]).callbacks.last)
    assert instantiate(compose_cfg(tmp_path, ["checkpoint_every=null"]).callbacks.last) is None
    assert "checkpoint_every=null: periodic checkpoints are off" in caplog.text


def test_rows_are_on_disk_as_they_are_logged(tmp_path):
    """What a checkpoint covers is in metrics.csv when it is written (Lightning writes rows out at every log_metrics;
    CSVLogger alone would keep 100 in memory): at the checkpoint of step N, the rows of steps 0 .. N-2 (step N-1's
    row is logged right after the checkpoint, in the same loop iteration)."""
    seen = {}

    class Probe(L.Callback):
        def on_save_checkpoint(self, trainer, module, checkpoint):
            with open(tmp_path / "metrics.csv", newline="") as f:
                seen[trainer.global_step] = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]

    every_2 = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)
    run = nan_guard_trainer(
        tmp_path, logger=RunCSVLogger(str(tmp_path)), log_every_n_steps=1, enable_checkpointing=True
    )
    run.callbacks.extend([every_2, Probe()])
    run.fit(LMModule(tiny_lm(), OPTIM), train_dataloaders=batches())
    assert seen[2] == [0] and seen[4] == [0, 1, 2] and seen[6][:5] == [0, 1, 2, 3, 4]


def test_a_row_cut_off_by_the_kill_is_dropped_on_resume(finished, tmp_path, caplog):
    """A kill in the middle of writing a row leaves a line without its end: it was read as a row without a step
    (int(None): every resume failed), or Lightning's next row was appended to it."""
    run = killed_at(finished, tmp_path / "run", 6)  # no row after the checkpoint: only the cut-off one goes
    with open(run / "metrics.csv", "a", newline="") as f:
        f.write("0,")  # the first field of a row, then the kill
    caplog.set_level(logging.INFO, logger="lmlab.train")
    train(compose_cfg(run, [*RUN, "resume=auto"]))
    assert cells_of_whole_rows(run) == metric_cells(finished)
    assert "metrics.csv: dropped its last row, which the kill cut off in the middle" in caplog.text


def cells_of_whole_rows(run: Path) -> Counter:
    """metric_cells, after checking that every row of metrics.csv has all the header's fields and a line end."""
    text = (run / "metrics.csv").read_text()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines()))
    assert all(None not in row and None not in row.values() for row in rows)
    return metric_cells(run)


def test_init_from_of_another_family_than_model_is_an_error(tmp_path, tiny_tokenizer):
    """model=gpt2-tiny init_from=<a LLaMA>: the LLaMA trained in outputs/<stage>/gpt2-tiny/, named gpt2-tiny."""
    llama = tmp_path / "llama"
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    LlamaForCausalLM(config).save_pretrained(llama)
    tiny_tokenizer.save_pretrained(llama)
    with pytest.raises(ValueError, match=f"init_from={llama} holds a llama model but model=gpt2-tiny is a gpt2 preset"):
        train(compose_cfg(tmp_path / "run", ["model=gpt2-tiny", f"init_from={llama}", "max_steps=1"]))


def test_init_from_of_a_family_without_a_preset_trains_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    """A Qwen2 checkpoint has no model= preset to be named after: the nearest one names the run (it was an error)."""
    qwen = tmp_path / "qwen"
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    Qwen2ForCausalLM(config).save_pretrained(qwen)
    tiny_tokenizer.save_pretrained(qwen)
    caplog.set_level(logging.WARNING)
    train(compose_cfg(tmp_path / "run", [f"init_from={qwen}", "max_steps=1", "callbacks.samples.num_prompts=0"]))
    assert f"init_from={qwen} holds a qwen2 model, a family no preset in conf/model/ builds" in caplog.text
    assert AutoConfig.from_pretrained(tmp_path / "run" / "hf").model_type == "qwen2"


def test_preset_families_come_from_conf_model():
    families = preset_families()
    assert families["mixtral"] == ["llama-moe-tiny", "llama-moe"] and "t5-tiny" in families["t5"]
    assert sum(map(len, families.values())) == len(list((REPO / "conf" / "model").glob("*.yaml")))


def test_a_kill_during_a_validation_repeats_it_on_resume(finished, tmp_path, monkeypatch):
    """Killed during the validation at step 6 (checkpoint_every = val_check_interval = 3). last.ckpt was written
    before that validation, and Lightning counts a validation at the checkpoint's step as done: the resumed run
    never validated at step 6. last.ckpt now waits for its step's validation, so the resume starts from step 3's
    and runs both again: the same metrics and weights as the uninterrupted run."""
    from lightning_modules.lm import LMModule

    class Killed(Exception):
        pass

    def killed(module):
        if module.global_step == 6:
            raise Killed("during the validation at step 6")

    run = [*RUN, "resume=auto"]
    monkeypatch.setattr(LMModule, "on_validation_start", killed, raising=False)
    with pytest.raises(Killed):
        train(compose_cfg(tmp_path, run))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    monkeypatch.undo()
    train(compose_cfg(tmp_path, run))
    assert metric_cells(tmp_path) == metric_cells(finished)
    for name, weights in final_weights(finished).items():
        assert torch.equal(final_weights(tmp_path)[name], weights), name


def test_a_signal_at_a_validating_step_saves_after_the_validation(finished, tmp_path, monkeypatch):
    """SIGTERM during step 3, which validates (val_check_interval=3): last.ckpt was written before that validation,
    and the resumed run skipped it. Now the save and the exit wait for its end: the resumed run's metrics and weights
    are the uninterrupted run's."""
    import os
    import signal

    from lightning_modules.lm import LMModule

    training_step = LMModule.training_step

    def signalled(module, batch, batch_idx):
        if module.global_step == 2:  # the step that ends at global step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(module, batch, batch_idx)

    monkeypatch.setattr(LMModule, "training_step", signalled)
    with pytest.raises(SystemExit) as exited:
        train(compose_cfg(tmp_path, [*RUN, "resume=auto"]))
    assert exited.value.code == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    monkeypatch.undo()
    train(compose_cfg(tmp_path, [*RUN, "resume=auto"]))
    assert metric_cells(tmp_path) == metric_cells(finished)
    for name, weights in final_weights(finished).items():
        assert torch.equal(final_weights(tmp_path)[name], weights), name


def test_a_checkpoint_of_other_ranks_is_refused_with_the_devices_to_use(finished, tmp_path):
    """Each rank's data position and random state are its own: a 2-rank checkpoint resumed on one device failed in
    torchdata with a bare AssertionError."""
    run = killed_at(finished, tmp_path / "run", 3)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["rng_states"] = ckpt["rng_states"] * 2
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(
        ValueError, match=r"written by 2 rank\(s\) and this run has 1: resume it with trainer.devices=2"
    ):
        train(compose_cfg(run, [*RUN, "resume=auto"]))


def test_no_periodic_checkpoint_in_the_middle_of_an_accumulation_window():
    """Right after a resume the step's number is the checkpoint's, and Lightning's ModelCheckpoint saved it again at
    the window's first micro-batch, without that window's gradients."""
    from types import SimpleNamespace

    from lmlab.train.checkpoint_io import periodic_checkpoint

    last = periodic_checkpoint(2, dirpath="unused", save_last=True, save_top_k=0)
    saved = []
    last._save_last_checkpoint = lambda *args: saved.append(args)
    mid_window = SimpleNamespace(fit_loop=SimpleNamespace(_should_accumulate=lambda: True), global_step=2)
    last.on_train_batch_end(mid_window, None, None, None, 0)
    assert saved == []


@pytest.mark.slow
def test_a_kill_after_the_last_validation_keeps_the_best_checkpoint_exportable(tmp_path, monkeypatch):
    """last.ckpt at step N is written before the validation at N, which may save a new best-step<N>.ckpt and delete
    the old best: the state restored from last.ckpt then names a deleted file. Killed right there (after the final
    validation, before the export), the resumed run must export the best checkpoint on disk, not crash on the old."""
    from lightning_modules.lm import LMModule

    class Killed(Exception):
        pass

    def killed(module):
        if module.global_step == 6:
            raise Killed("after the validation at step 6")

    run = [*RUN[:-1], "export=best", "resume=auto"]
    monkeypatch.setattr(LMModule, "on_validation_end", killed, raising=False)
    with pytest.raises(Killed):
        train(compose_cfg(tmp_path, run))
    assert not (tmp_path / "checkpoints" / "best-step3.ckpt").exists(), "the validation at step 6 replaced the best"
    monkeypatch.undo()
    train(compose_cfg(tmp_path, run))
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    best = torch.load(tmp_path / "checkpoints" / "best-step6.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(exported[name], best[f"model.{name}"]) for name in exported)
