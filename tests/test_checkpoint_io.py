"""Checkpoints are the old file or the whole new one: written beside their target, never through $TMPDIR (issue 16)."""

from __future__ import annotations

import errno
import tempfile

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from lmlab.core.files import write_atomically
from lmlab.train.checkpoint_io import AtomicCheckpointIO


def refuse_tmpdir(*args, **kwargs):
    raise AssertionError("a checkpoint went through $TMPDIR: a move from another filesystem is a copy, not atomic")


def test_a_checkpoint_is_written_beside_its_target(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "mkstemp", refuse_tmpdir)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse_tmpdir)
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3, "w": torch.arange(4.0)}, path)
    assert torch.load(path)["step"] == 3 and torch.equal(torch.load(path)["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """A disk that fills mid-write (here: ENOSPC after some bytes) leaves the previous file whole and no debris."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def full_disk(f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, full_disk)
    assert path.read_bytes() == before and torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_every_trainer_preset_saves_through_it(tmp_path):
    for trainer in ("cpu", "gpu"):
        cfg = compose_cfg(tmp_path, [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.precision=32-true"])
        assert isinstance(instantiate(cfg.trainer).strategy.checkpoint_io, AtomicCheckpointIO), trainer
