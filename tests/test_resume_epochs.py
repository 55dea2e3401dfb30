"""Issue 16, item 1: a run resumed from a checkpoint ends bit-identical to an uninterrupted run, also when it crosses
epoch boundaries after the resume (each epoch shuffled anew), for every stage.

The data are a few dozen records per shape, so an epoch is a handful of batches of 8 and a short run crosses several
epoch boundaries. A resume in the same process restores the batch order exactly as a restart after SIGKILL does
(everything comes from the checkpoint file); tests/test_export_resume.py kills a real process.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg
from hydra.utils import instantiate
from safetensors.torch import load_file
from test_nan_guard import run_ranks

from train import connect_data, prepare_tokenizer, train

sys.path.insert(0, str(REPO / "scripts"))
from make_shapes import make as make_shapes  # noqa: E402
from make_shapes import write as write_shapes  # noqa: E402

SAMPLE = REPO / "data" / "sample"

# (file in data/sample, lines kept): epochs of 5 or 6 batches of 8 for each shape (with the BPE a run trains)
CUTS = {
    "text": ("pretrain_en.txt", 120),
    "sft": ("sft_alpaca.jsonl", 36),
    "pairs": ("preference.jsonl", 36),
    "messages": ("messages.tsv", 110),
}

# per stage, the model and the stage on its small data (a CUTS key)
STAGES = {
    "pretrain": (["stage=pretrain", "data.val_fraction=0.2"], "text"),
    "t5_pretrain": (["model=t5-tiny", "stage=pretrain", "data.val_fraction=0.2"], "text"),
    "sft": (["stage=sft"], "sft"),
    "sft_lora": (["stage=sft", "peft=lora"], "sft"),
    "t5_sft": (["model=t5-tiny", "stage=sft"], "sft"),
    "dpo": (["stage=dpo"], "pairs"),
    "classify": (["stage=classify"], "messages"),
    "classify_lora": (["stage=classify", "peft=lora"], "messages"),
    "vlm": (["stage=vlm", "data.val_files=null", "data.val_fraction=0.2"], "shapes"),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """The first lines of each bundled sample file (CUTS)."""
    folder = tmp_path_factory.mktemp("small")
    paths = {}
    for key, (name, lines) in CUTS.items():
        head = (SAMPLE / name).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        paths[key] = folder / name
        paths[key].write_text("".join(head), encoding="utf-8")
    paths["shapes"] = folder / "shapes.parquet"  # 45 generated image questions (scripts/make_shapes.py)
    write_shapes(make_shapes(45, 32, 0), paths["shapes"])
    return paths


def stage_overrides(stage: str, small_data: dict[str, Path]) -> list[str]:
    overrides, data = STAGES[stage]
    return [*overrides, f"data.train_files=[{small_data[data]}]", "callbacks.samples.num_prompts=0"]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Batch lists equal key by key (tensors with torch.equal)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return False
        for key in x:
            equal = torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]
            if not equal:
                return False
    return True


def through_a_file(state: dict) -> dict:
    """``state`` saved and loaded as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "stage, workers",
    [
        *[(stage, 0) for stage in ("pretrain", "t5_pretrain", "sft", "dpo", "classify")],
        pytest.param("pretrain", 2, marks=pytest.mark.slow),  # ~5 s: worker processes start at each epoch's loader
    ],
)
def test_a_restored_loader_continues_the_epoch_and_the_next_ones(tmp_path, stage, workers, small_data):
    """The training loader's state saved at every batch of epoch 1 and loaded into a loader of a fresh datamodule
    (a restarted process) gives the rest of epoch 1 and epochs 2 and 3 exactly as a loader that was never
    interrupted; also with loader processes (``workers``, as on a GPU)."""

    def datamodule():  # as train.py makes it; the second time with the tokenizer the first one saved
        cfg = compose_cfg(tmp_path, [*stage_overrides(stage, small_data), f"num_workers={workers}"])
        dm = instantiate(cfg.data)
        tokenizer = prepare_tokenizer(cfg, dm, tmp_path, classifier=stage == "classify")
        connect_data(cfg, dm, tokenizer)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def epoch(loader, number: int) -> list[dict]:  # as Lightning runs one: set_epoch at its start
        loader.sampler.set_epoch(number)
        return list(loader)

    first, restarted = datamodule(), datamodule()
    straight = first.train_dataloader()
    epochs = [epoch(straight, number) for number in range(4)]
    assert 3 <= len(epochs[0]) <= 8, "an epoch of a few batches (CUTS)"
    assert not same_batches(epochs[1], epochs[2]), "every epoch has an order of its own"

    for position in range(len(epochs[1]) + 1):
        interrupted = first.train_dataloader()
        epoch(interrupted, 0)
        interrupted.sampler.set_epoch(1)
        batches = iter(interrupted)
        for _ in range(position):
            next(batches)
        resumed = restarted.train_dataloader()
        resumed.load_state_dict(through_a_file(interrupted.state_dict()))
        # as Lightning: the resumed epoch's number is set after its iterator is made, before its first batch; a
        # restore after an epoch's last batch resumes in the next epoch
        at_end = position == len(epochs[1])
        restored = iter(resumed)
        resumed.sampler.set_epoch(2 if at_end else 1)
        rest = list(restored)
        expected = epochs[2] if at_end else epochs[1][position:]
        assert same_batches(rest, expected), f"the resumed epoch after a restore in epoch 1 at batch {position}"
        if not at_end:
            assert same_batches(epoch(resumed, 2), epochs[2]), f"epoch 2 after a restore in epoch 1 at batch {position}"
        assert same_batches(epoch(resumed, 3), epochs[3]), f"epoch 3 after a restore in epoch 1 at batch {position}"


def checkpoint_at(run: Path, step: int) -> Path:
    (path,) = (run / "checkpoints").glob(f"epoch=*-step={step}.ckpt")
    return path


def resume_from(checkpoint: Path, straight: Path, run: Path) -> None:
    """Make ``run`` a run folder killed after ``checkpoint`` was written: the straight run's tokenizer, that
    checkpoint as last.ckpt and, beside it, the cut-off temporary file of the next save (a kill during a
    checkpoint write, lmlab.core.files.write_atomically)."""
    shutil.copytree(straight / "tokenizer", run / "tokenizer")
    (run / "checkpoints").mkdir()
    shutil.copy(checkpoint, run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / ".last.ckpt.tmp4242").write_bytes(checkpoint.read_bytes()[:1000])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, every, steps",
    [
        ("dpo", 4, 16),  # a resume at step 4: mid epoch 0 (epochs of 5 batches)
        ("t5_sft", 5, 15),  # 5: epoch 0's last batch
        ("t5_pretrain", 7, 21),  # 7: mid epoch 1 (epochs of 5 batches), span corruption
        ("sft", 6, 18),  # 6: epoch 1's first batch
        ("sft_lora", 5, 15),  # 5: epoch 0's last batch, LoRA adapters (only they train)
        ("pretrain", 8, 16),  # 8: mid epoch 1
        ("classify", 3, 15),  # 3: mid epoch 0 (epochs of 6 batches)
        ("classify_lora", 3, 15),  # the same with LoRA adapters: they and the head train
        ("vlm", 5, 15),  # 5: mid epoch 1 (epochs of 4 or 5 batches), images decoded in the loader
    ],
)
def test_resume_across_epoch_boundaries_is_bit_identical(tmp_path, stage, every, steps, small_data):
    """A run resumed (resume=auto) from its first checkpoint, at step ``every``, crosses at least two epoch
    boundaries and ends on the uninterrupted run's weights."""
    overrides = [
        *stage_overrides(stage, small_data),
        f"max_steps={steps}",
        f"checkpoint_every={every}",
        "callbacks.last.save_top_k=-1",  # keep each checkpoint (epoch=E-step=S.ckpt) beside last.ckpt
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "export=last",
    ]
    straight = tmp_path / "straight"
    train(compose_cfg(straight, overrides))
    checkpoint = checkpoint_at(straight, every)
    epochs = [torch.load(path, weights_only=False)["epoch"] for path in (checkpoint, checkpoint_at(straight, steps))]
    assert epochs[1] - epochs[0] >= 2, f"epochs {epochs}: the resumed run must cross two epoch boundaries"

    resumed = tmp_path / "resumed"
    resume_from(checkpoint, straight, resumed)
    train(compose_cfg(resumed, [*overrides, "resume=auto"]))
    a = load_file(straight / "hf" / "model.safetensors")
    b = load_file(resumed / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a resume at step {every}"


def _train_on_rank(rank: int, run: Path, overrides: list[str]) -> None:
    """One rank of a 2-rank DDP train.py run (tests/test_nan_guard.py's run_ranks: gloo, forked)."""
    train(compose_cfg(run, [*overrides, "trainer.devices=2", "+trainer.strategy=ddp"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "every, workers",
    [(5, 0), (5, 2), (3, 0)],
    ids=["mid-epoch", "mid-epoch-loader-processes", "epoch-end"],
)
def test_a_ddp_run_resumes_bit_identical(tmp_path, small_data, every, workers):
    """2 ranks (epochs of 3 batches per rank), resumed at step 5 (mid epoch 1) or 3 (epoch 0's last batch), crossing
    two epoch boundaries after it. Lightning wrapped the loader's sampler in its DistributedSamplerWrapper, which keeps
    no position: the resumed run drew other batches. torchdata's StatefulDistributedSampler alone kept no epoch: with
    loader processes the resumed epoch came in epoch 0's order, and at an epoch's end every later epoch was shifted."""
    overrides = [
        *stage_overrides("pretrain", small_data),
        "max_steps=12",
        f"checkpoint_every={every}",
        f"num_workers={workers}",
        "callbacks.last.save_top_k=-1",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "export=last",
    ]
    tokenizer = tmp_path / "tokenizer-run"  # trained once, so that the ranks never write one tokenizer together
    train(compose_cfg(tokenizer, [*overrides, "max_steps=1"]))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(tokenizer / "tokenizer", straight / "tokenizer")
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    results = run_ranks(_train_on_rank, straight, overrides, out_dir=ranks, timeout=240)
    assert all("returned" in result for result in results), results
    checkpoint = checkpoint_at(straight, every)
    last = straight / "checkpoints" / "last.ckpt"
    epochs = [torch.load(path, weights_only=False)["epoch"] for path in (checkpoint, last)]
    assert epochs[1] - epochs[0] >= 2, f"epochs {epochs}: the resumed run must cross two epoch boundaries"

    resume_from(checkpoint, straight, resumed)
    for path in ranks.iterdir():
        path.unlink()
    results = run_ranks(_train_on_rank, resumed, [*overrides, "resume=auto"], out_dir=ranks, timeout=240)
    assert all("returned" in result for result in results), results
    a = load_file(straight / "hf" / "model.safetensors")
    b = load_file(resumed / "hf" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a DDP resume at step {every}"


@pytest.mark.slow
def test_a_max_epochs_run_resumed_at_an_epochs_end_is_bit_identical(tmp_path, small_data):
    """max_epochs=3 (max_steps=-1), resumed from epoch 0's last batch (5 batches per epoch): Lightning restores no
    loader state there, and the sampler drew epoch 0's order again for epoch 1. Each epoch's order now comes from
    seed + epoch."""
    overrides = [
        *stage_overrides("pretrain", small_data),
        "max_steps=-1",
        "max_epochs=3",
        "checkpoint_every=5",
        "callbacks.last.save_top_k=-1",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "export=last",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_cfg(straight, overrides))
    resume_from(checkpoint_at(straight, 5), straight, resumed)
    train(compose_cfg(resumed, [*overrides, "resume=auto"]))
    for run in (straight, resumed):
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 15
    a = load_file(straight / "hf" / "model.safetensors")
    b = load_file(resumed / "hf" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a resume at an epoch's end"
