"""Run folders: the config id, which folder resume=auto picks, and the wandb mode."""

from __future__ import annotations

from conftest import REPO
from hydra import compose, initialize_config_dir

from lmlab.core.runs import find_interrupted, fingerprint, wandb_offline


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


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
