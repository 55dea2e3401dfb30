"""hf/ export round-trips, init_from loads weights, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SFT_TENTH, TEXT_TENTH, TINY, compose_cfg, run_script
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from train import train

# a tenth of the bundled sample text: what these runs prove (export, init_from, freeze) holds for any data
PRETRAIN = ["max_steps=10", "callbacks.samples.num_prompts=0", TEXT_TENTH]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, DictConfig]:
    """A finished 10-step llama-tiny pretraining run (its folder and config), which the export, init_from, freeze and
    saved-hyperparameter tests below read and never change."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = compose_cfg(run, PRETRAIN)
    train(cfg)
    return run, cfg


@pytest.mark.parametrize("model, auto", [("llama-tiny", AutoModelForCausalLM), ("t5-tiny", AutoModelForSeq2SeqLM)])
def test_hf_export_loads_in_plain_transformers_with_equal_logits(tmp_path, model, auto, request):
    if model == "llama-tiny":
        run, cfg = request.getfixturevalue("pretrained")
    else:
        run, cfg = tmp_path, compose_cfg(tmp_path, [f"model={model}", *PRETRAIN])
        train(cfg)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    exported = auto.from_pretrained(run / "hf").eval()
    tok = AutoTokenizer.from_pretrained(run / "hf")
    ids = {"input_ids": tok("Alice has 3 apples. 三加四等于七。", return_tensors="pt")["input_ids"]}
    if exported.config.is_encoder_decoder:
        ids["decoder_input_ids"] = tok("Alice has", return_tensors="pt")["input_ids"]

    from lmlab.core.models import build_model

    rebuilt = build_model(cfg.model, tok)
    rebuilt.load_state_dict(
        {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(exported(**ids).logits, rebuilt(**ids).logits)
    assert (run / "hf" / "model.safetensors").is_file()
    assert tok.chat_template  # chat formatting travels with the export


@pytest.mark.slow
def test_init_from_starts_from_the_previous_weights(tmp_path, pretrained):
    first, _ = pretrained
    cfg = compose_cfg(
        tmp_path / "sft",
        [
            "stage=sft",
            SFT_TENTH,
            f"init_from={first}",
            "max_steps=1",
            "lr=1e-12",
            "min_lr=0",
            "callbacks.samples.num_prompts=0",
        ],
    )
    train(cfg)
    before = load_file(first / "hf" / "model.safetensors")
    after = load_file(tmp_path / "sft" / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:  # one step at lr 1e-12 leaves the loaded weights (not a fresh init) in place
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "sft" / "hf")
    assert saved_tok.get_vocab() == AutoTokenizer.from_pretrained(first / "hf").get_vocab()


@pytest.mark.slow
def test_freeze_embeddings_keeps_them_bit_identical(tmp_path, pretrained):
    first, _ = pretrained
    train(
        compose_cfg(
            tmp_path / "sft",
            [
                "stage=sft",
                SFT_TENTH,
                f"init_from={first}",
                "max_steps=5",
                "stage.module.freeze=[embeddings]",
                "callbacks.samples.num_prompts=0",
            ],
        )
    )
    before = load_file(first / "hf" / "model.safetensors")
    after = load_file(tmp_path / "sft" / "hf" / "model.safetensors")
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first 70 lines of the bundled English text (a fifth held out): epochs of 3 batches of 8 x 64 tokens for
    both models, so a 40-step run crosses an epoch boundary every 3 steps (each epoch shuffled anew), and a kill at
    any checkpoint from step 15 to 35 lies past one with two more ahead, however late the kill lands."""
    lines = (REPO / "data" / "sample" / "pretrain_en.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("".join(lines[:70]), encoding="utf-8")
    return path


def _train_cmd(outputs: Path, text: Path, *extra: str, wandb: bool = False) -> list[str]:
    tiny = [t for t in TINY if not (wandb and t.startswith("logger="))]
    return [
        "train.py",
        *tiny,
        f"data.train_files=[{text}]",
        "data.val_fraction=0.2",
        "max_steps=40",
        "checkpoint_every=5",
        # never at a periodic checkpoint before the last step: resumed from a checkpoint written at a step where a
        # validation is due, Lightning 2.6 skips that validation (export=best's choice and summary.json then differ)
        "trainer.val_check_interval=8",
        "callbacks.samples.num_prompts=0",
        f"paths.log_dir={outputs}",
        f"paths.cache_dir={outputs}/cache",
        *extra,
    ]


def _run_folders(outputs: Path, model: str = "llama-tiny") -> list[Path]:
    return sorted((outputs / "pretrain" / model).iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_text) -> Path:
    """The run folder of an uninterrupted run of _train_cmd's settings, made once for the interruption tests. It
    trains in this process (train.train on the composed config): the CLI runs these tests compare with it are the
    ones interrupted, and an in-process run of the same settings ends on the same weights as a train.py process."""
    run = tmp_path_factory.mktemp("straight") / "run"
    overrides = [a for a in _train_cmd(run.parent, small_text)[1:] if a not in TINY and not a.startswith("paths.")]
    train(compose_cfg(run, overrides))
    return run


def _step_of(path: Path, seen: dict) -> int:
    """The global step of the checkpoint at ``path`` (-1 while there is none), read again only when the file changed
    (a kill test polls every 50 ms; reloading an unchanged checkpoint each time takes CPU from the run it watches)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return -1
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    if seen.get("key") != key:
        seen.update(key=key, step=torch.load(path, weights_only=False, mmap=True)["global_step"])
    return seen["step"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, uninterrupted, small_text):
    """SIGKILL mid-run, past an epoch boundary, then `resume=auto`, which crosses two more: the final weights equal
    an uninterrupted run's. LLaMA only: T5's restore across epoch boundaries (span corruption's noise included) is
    tests/test_resume_epochs.py's, in process; what a real kill adds (the folder resume=auto picks, metrics.csv and
    the wandb run continuing, the summary's counts) does not depend on the architecture."""
    model = "llama-tiny"
    crashed = tmp_path / "crashed"
    straight_dir = uninterrupted

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *_train_cmd(crashed, small_text, f"model={model}", wandb=True)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = time.time() + 120, {}
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(crashed.glob(f"pretrain/{model}/*/checkpoints/last.ckpt"))
        if ckpts and _step_of(ckpts[0], seen) >= 15:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
    (killed_dir,) = _run_folders(crashed, model)
    assert not (killed_dir / "hf").exists()
    epochs = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] for run in (killed_dir, straight_dir)
    ]
    assert epochs[0] >= 1 and epochs[1] - epochs[0] >= 2, f"epochs {epochs}: killed past a boundary, two to cross"

    run_script(*_train_cmd(crashed, small_text, f"model={model}", "resume=auto", wandb=True))
    assert _run_folders(crashed, model) == [killed_dir], "resume=auto must continue in the interrupted run's folder"
    a = load_file(straight_dir / "hf" / "model.safetensors")
    b = load_file(killed_dir / "hf" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight_dir, killed_dir)]
    assert summaries[0] == summaries[1], "the memorization guard's counts must survive the kill"
    with open(killed_dir / "metrics.csv") as f:
        steps = {int(row["step"]) for row in csv.DictReader(f)}
    assert min(steps) < 15 and max(steps) == 39, "metrics.csv keeps the rows from before the kill and continues"
    wandb_runs = sorted((killed_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1, (
        f"the resumed run must log to the same wandb run id: {[p.name for p in wandb_runs]}"
    )


@pytest.mark.slow
def test_resume_auto_without_an_interrupted_run_starts_fresh(tmp_path, small_text):
    """`train.py ... resume=auto` beside a finished run of the same config (the same id) makes a new run folder. Both
    runs train in this process, each in the folder that command composes to (hydra.run.dir, where train.py runs; the
    folder resume=auto picks is decided there, as the SIGTERM test below relies on): the first when no run is there
    yet, the second beside the finished first. train.py's own command line resuming is the kill test's above."""
    cmd = _train_cmd(tmp_path, small_text, "max_steps=5", "resume=auto")

    def run_dir() -> Path:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return Path(compose("train", overrides=cmd[1:], return_hydra_config=True).hydra.run.dir)

    first = run_dir()
    assert first.parent == tmp_path / "pretrain" / "llama-tiny" and not first.exists()
    train(compose_cfg(first, cmd[1:]))
    assert (first / "hf" / "config.json").is_file()  # finished
    time.sleep(1.1)  # run folders are named by the second they start in
    second = run_dir()
    assert second != first and not second.exists(), "resume=auto must not pick the finished run's folder"
    train(compose_cfg(second, cmd[1:]))
    assert (second / "hf" / "config.json").is_file()
    folders = _run_folders(tmp_path)
    assert len(folders) == 2 and first in folders, "the finished run must not be continued"
    assert len({folder.name.rsplit("_", 1)[1] for folder in folders}) == 1, "one config id: the same config"


def test_module_saves_its_hyperparameters(pretrained):
    run, _ = pretrained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["optim"]["optimizer"]["lr"] == 3.0e-3
    assert ckpt["hyper_parameters"]["freeze"] == []


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_nonzero_and_resumes_exactly(tmp_path, uninterrupted, small_text):
    """SIGTERM (a scheduler's preemption) mid-run: last.ckpt at the step reached, exit 128 + 15, and resume=auto ends
    on an uninterrupted run's weights."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, *_train_cmd(stopped, small_text, "checkpoint_every=7")],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = time.time() + 120, {}
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(stopped.glob("pretrain/llama-tiny/*/checkpoints/last.ckpt"))
        if ckpts and _step_of(ckpts[0], seen) >= 7:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stderr = proc.communicate()[1]
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}:\n{stderr[-3000:]}"
    (run_dir,) = _run_folders(stopped)
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert (
        f"SIGTERM: saved {run_dir / 'checkpoints' / 'last.ckpt'} at step {step};" in (run_dir / "train.log").read_text()
    )
    assert 7 <= step < 40 and not (run_dir / "hf").exists()

    # the resume in this process (train.py's resume=auto after a kill: the test above): the folder that command
    # composes to is the stopped run's, and training there continues from the step SIGTERM saved
    resume = _train_cmd(stopped, small_text, "checkpoint_every=7", "resume=auto")[1:]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose("train", overrides=resume, return_hydra_config=True).hydra.run.dir == str(run_dir)
    train(compose_cfg(run_dir, resume))
    assert _run_folders(stopped) == [run_dir]
    a = load_file(uninterrupted / "hf" / "model.safetensors")
    b = load_file(run_dir / "hf" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a), "the resumed run's weights differ"


def test_sigint_is_handled_like_sigterm(tmp_path):
    """Ctrl+C during training: the same path, exit 128 + 2, after saving at an optimizer step's end."""
    from lmlab.train.callbacks import Preemption

    saved = []

    class Trainer:
        global_step = 12
        world_size = 1
        enable_validation = False
        received_sigterm = False  # Lightning's own SIGTERM flag
        fit_loop = type("Loop", (), {"_should_accumulate": staticmethod(lambda: False)})()

        def save_checkpoint(self, path):
            saved.append(path)

    guard = Preemption(str(tmp_path / "last.ckpt"), ["SIGTERM", "SIGINT", "SIGUSR1"])
    guard.on_train_batch_end(Trainer())  # no signal: nothing happens
    guard._note(signal.SIGINT, None)
    with pytest.raises(SystemExit) as stop:
        guard.on_train_batch_end(Trainer())
    assert stop.value.code == 128 + signal.SIGINT and saved == [str(tmp_path / "last.ckpt")]
