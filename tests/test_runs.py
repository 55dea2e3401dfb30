"""Run folders: the config id, which folder resume=auto and resume=<run dir> pick, and the wandb mode."""

from __future__ import annotations

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from lmlab.core.runs import find_interrupted, fingerprint, register_resolvers, wandb_offline

register_resolvers()


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_fingerprint_depends_on_the_config_not_on_paths_or_resume():
    base = fingerprint(composed("lr=1e-3"))
    assert fingerprint(composed("lr=1e-3")) == base
    assert fingerprint(composed("lr=1e-3", "resume=auto", "paths.log_dir=/elsewhere")) == base
    assert fingerprint(composed("lr=2e-3")) != base
    assert fingerprint(composed("lr=1e-3", "model=gpt2-tiny")) != base


def test_resume_picks_the_newest_unfinished_run_of_the_same_id(tmp_path):
    def run(name: str, finished: bool) -> None:
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (tmp_path / name / "hf").mkdir()
            (tmp_path / name / "hf" / "config.json").write_text("{}")

    run("2026-01-01_10-00-00_abcd1234", finished=False)
    run("2026-01-02_10-00-00_abcd1234", finished=False)
    run("2026-01-03_10-00-00_abcd1234", finished=True)
    run("2026-01-04_10-00-00_ffff0000", finished=False)
    assert find_interrupted(tmp_path, "abcd1234").name == "2026-01-02_10-00-00_abcd1234"
    assert find_interrupted(tmp_path, "00000000") is None


def test_wandb_is_offline_unless_wandb_mode_is_online(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not wandb_offline()


def test_resume_run_dir_runs_in_that_folder_and_keeps_its_original_config(tmp_path):
    """resume=<run dir> continues that folder whatever its settings; Hydra saves this invocation's config beside the
    one the run started with (.hydra/resume-<time>/) instead of over it."""
    run = tmp_path / "2026-01-01_10-00-00_abcd1234"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cfg = composed(f"resume={run}", "lr=1e-3", hydra=True)
    assert cfg.hydra.run.dir == str(run)
    assert cfg.hydra.output_subdir.startswith(".hydra/resume-")
    assert composed("resume=auto", f"paths.log_dir={tmp_path}", hydra=True).hydra.output_subdir == ".hydra"


def test_resume_run_dir_without_checkpoints_is_an_error_naming_it(tmp_path):
    with pytest.raises(Exception, match=f"resume={tmp_path}: no checkpoints/\\*.ckpt in {tmp_path}"):
        str(composed(f"resume={tmp_path}", hydra=True).hydra.run.dir)
