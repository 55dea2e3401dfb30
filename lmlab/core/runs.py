"""Run folders: naming, the config fingerprint, and finding an interrupted run for ``resume=auto``.

A run folder is ``<outputs>/<stage>/<model>/<date>_<time>_<fingerprint[:8]>``. The
fingerprint hashes the composed config (before interpolation, without ``hydra``, ``paths`` and
``resume``), so two invocations with the same overrides share it. With ``resume=auto`` the
Hydra run dir resolves to the newest folder of the same fingerprint that has a last.ckpt but
no finished export, and training continues there; with none, a new folder is made.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

UNHASHED_KEYS = ("hydra", "paths", "resume")
FINISHED_MARKER = "hf/config.json"


def fingerprint(cfg: DictConfig) -> str:
    keep = [k for k in cfg if k not in UNHASHED_KEYS]
    view = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=False)
    return hashlib.sha1(OmegaConf.to_yaml(view, sort_keys=True).encode()).hexdigest()


def find_interrupted(parent: Path, short_id: str) -> Path | None:
    """The newest run folder under ``parent`` with this id, a last.ckpt, and no finished export."""
    candidates = [
        d
        for d in parent.glob(f"*_{short_id}")
        if (d / "checkpoints" / "last.ckpt").is_file() and not (d / FINISHED_MARKER).is_file()
    ]
    return max(candidates, key=lambda d: d.name) if candidates else None


def run_dir(parent: str, stamp: str, *, _root_: DictConfig) -> str:
    """OmegaConf resolver for hydra.run.dir: a new folder, or the interrupted one under resume=auto."""
    short_id = fingerprint(_root_)[:8]
    resume = _root_.get("resume")
    if resume not in (None, "auto"):
        raise ValueError(f"resume must be 'auto' or null, got {resume!r}")
    if resume == "auto":
        found = find_interrupted(Path(parent), short_id)
        if found is not None:
            return str(found)
    return str(Path(parent) / f"{stamp}_{short_id}")


def run_id(folder: str) -> str:
    """A wandb run id that is the same for a run folder and its resumption, and unique across sweeps."""
    return hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def wandb_offline() -> bool:
    """wandb logs offline (no account or network needed) unless WANDB_MODE=online says otherwise."""
    return os.environ.get("WANDB_MODE", "offline") != "online"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lmlab.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("lmlab.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("lmlab.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("lmlab.basename", lambda p: Path(p).name, replace=True)
