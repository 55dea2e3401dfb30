"""Run folders: naming, the config fingerprint, which run ``resume=`` continues, and what it says about it.

A run folder is ``<outputs>/<stage>/<model>/<date>_<time>_<fingerprint[:8]>``. The fingerprint hashes the composed
config (before interpolation, without ``hydra``, ``paths`` and ``resume``), so two invocations with the same
overrides share it. The Hydra run dir (conf/hydra/default.yaml) follows ``resume``:

- null: a new folder;
- auto: the newest folder of the same fingerprint that has a last.ckpt but no finished export (an interrupted run),
  else a new folder; settings that differ in any way make another fingerprint, so another run is never continued;
- <run dir>: that folder, whatever its settings: it continues with the current ones (e.g. a lower lr after a NaN).

train.py then takes the checkpoint from :func:`resume_checkpoint`, which says what it found, why it did not resume,
and which settings differ, because the resolvers run while Hydra composes, before logging is set up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lmlab.train")

UNHASHED_KEYS = ("hydra", "paths", "resume")
FINISHED_MARKER = "hf/config.json"
LAST = Path("checkpoints") / "last.ckpt"
SAVED_CONFIG = Path(".hydra") / "config.yaml"  # what Hydra saved when the run started (see hydra_subdir)
WANDB_TMP = Path("wandb") / "tmp"  # wandb's temporary folders (lmlab.train.callbacks.import_wandb)
SHOWN_OTHERS = 3  # interrupted runs of other settings named when resume=auto finds none of its own


def fingerprint(cfg: DictConfig) -> str:
    keep = [k for k in cfg if k not in UNHASHED_KEYS]
    view = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=False)
    return hashlib.sha1(OmegaConf.to_yaml(view, sort_keys=True).encode()).hexdigest()


def interrupted_runs(parent: Path) -> list[Path]:
    """Run folders under ``parent`` with a last.ckpt and no finished export, newest first (names start with the
    time they started)."""
    runs = [d for d in parent.glob("*_*") if (d / LAST).is_file() and not (d / FINISHED_MARKER).is_file()]
    return sorted(runs, key=lambda d: d.name, reverse=True)


def find_interrupted(parent: Path, short_id: str) -> Path | None:
    """The newest run folder under ``parent`` with this id, a last.ckpt, and no finished export."""
    return next((d for d in interrupted_runs(parent) if d.name.endswith(f"_{short_id}")), None)


def resume_folder(resume: Any) -> Path:
    """The folder ``resume=<run dir>`` names; it must hold a checkpoint (train.py checks that one loads). Any other
    value is taken as a path (``resume=true`` is one, which holds none)."""
    folder = Path(str(resume)).expanduser().resolve()
    if not any((folder / "checkpoints").glob("*.ckpt")):
        raise FileNotFoundError(
            f"resume={resume}: no checkpoints/*.ckpt in {folder}; give a run folder "
            "(outputs/<stage>/<model>/<run>) or resume=auto"
        )
    return folder


def run_dir(parent: str, stamp: str, *, _root_: DictConfig) -> str:
    """OmegaConf resolver for hydra.run.dir: a new folder, the interrupted one under resume=auto, or the one
    resume=<run dir> names."""
    short_id = fingerprint(_root_)[:8]
    resume = _root_.get("resume")
    if resume == "auto":
        found = find_interrupted(Path(parent), short_id)
        if found is not None:
            return str(found)
    elif resume is not None:
        return str(resume_folder(resume))
    return str(Path(parent) / f"{stamp}_{short_id}")


def hydra_subdir(resume: str | None, stamp: str) -> str:
    """OmegaConf resolver for hydra.output_subdir: ``.hydra``, or ``.hydra/resume-<stamp>`` under resume=<run dir>,
    whose settings may differ from the run's: the folder's .hydra/config.yaml keeps the settings it started with
    (what train.py compares against) and each resumption's config and overrides are kept beside it."""
    return ".hydra" if resume in (None, "auto") else f".hydra/resume-{stamp}"


def read_step(path: Path) -> int | str:
    """The global step a checkpoint holds, or why it cannot be resumed from. Memory-mapped: the tensors are not read,
    so a large checkpoint checks in a moment and trainer.fit's load stays the only full one."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception as e:  # a cut-off zip, a foreign file, no global_step: all unusable
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def usable_checkpoint(folder: Path) -> tuple[Path, int]:
    """``checkpoints/last.ckpt`` and its step when it loads; else the other checkpoint in ``checkpoints/`` (the
    best-step<N>.ckpt conf/callbacks keeps, or any other) of the highest step that loads, with a warning naming the
    bad last.ckpt and why; else an error naming every file and why it cannot be used."""
    last = folder / LAST
    found = {last: read_step(last)}
    if isinstance(found[last], int):
        return last, found[last]
    found.update((p, read_step(p)) for p in sorted(last.parent.glob("*.ckpt")) if p != last)
    good = [(step, p) for p, step in found.items() if isinstance(step, int)]
    if not good:
        listed = "; ".join(f"{p.name}: {why}" for p, why in found.items())
        raise RuntimeError(f"cannot resume {folder}: no checkpoint in {last.parent} loads ({listed})")
    step, path = max(good)
    log.warning(
        "%s cannot be loaded (%s): resuming from %s (step %d) instead; the steps after it are trained again",
        last,
        found[last],
        path.name,
        step,
    )
    return path, step


@rank_zero_only
def remove_leftovers(run_dir: Path) -> None:
    """Before a run continues, remove what its killed predecessor left in its folder: the temporary file of a
    checkpoint write the kill cut off (lmlab.core.files.write_atomically's ``.<name>.tmp<pid>`` beside the target)
    and wandb's temporary folders (lmlab.train.callbacks.import_wandb)."""
    leftovers = [*(run_dir / "checkpoints").glob(".*.tmp*"), *(run_dir / WANDB_TMP).glob("*")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if leftovers:
        log.info("removed what the interrupted run left: %s", ", ".join(str(p.relative_to(run_dir)) for p in leftovers))


_UNSET = object()


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in UNHASHED_KEYS}


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name", "{...}"))
    return "(unset)" if value is _UNSET else str(value)


def _changes(before: Any, after: Any, key: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict) and before.get("name") == after.get("name"):
        prefix = f"{key}." if key else ""
        return [
            change
            for k in sorted(before.keys() | after.keys())
            for change in _changes(before.get(k, _UNSET), after.get(k, _UNSET), prefix + k)
        ]
    return [] if before == after else [f"{key}: {_show(before)} -> {_show(after)}"]


def setting_changes(before: DictConfig, after: DictConfig) -> list[str]:
    """The settings that differ, as ``key: before -> after`` with dotted keys; a config group whose preset differs
    (its ``name``) is one line, e.g. ``model: llama-tiny -> gpt2-tiny``. Without ``hydra``, ``paths``, ``resume``."""
    return _changes(_plain(before), _plain(after), "")


def _changes_since(folder: Path, cfg: DictConfig) -> str:
    saved = folder / SAVED_CONFIG
    if not saved.is_file():
        return f"no {SAVED_CONFIG} there to compare with"
    try:
        before = OmegaConf.load(saved)
    except Exception as e:  # cut off, hand-edited: resume=auto only names the run, which must not stop it
        return f"its {SAVED_CONFIG} cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    changes = setting_changes(before, cfg)
    return "; ".join(changes) if changes else "no setting differs"


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint and step that ``cfg.resume`` continues in ``run_dir`` (the folder :func:`run_dir` chose), or
    None to start afresh; logs what it found and, when it resumes nothing, why."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if not (run_dir / LAST).is_file():
            _log_not_resumed(cfg, run_dir)
            return None
        path, step = usable_checkpoint(run_dir)
        log.info("resume=auto: resuming %s from step %d (%s)", run_dir, step, path.name)
        return path, step
    folder = resume_folder(cfg.resume)
    if folder != run_dir.resolve():
        raise ValueError(
            f"resume={cfg.resume} but the run folder is {run_dir}: leave hydra.run.dir to lmlab.run_dir "
            "(conf/hydra/default.yaml), which makes it the folder resume names"
        )
    path, step = usable_checkpoint(folder)
    log.info(
        "resume=%s: resuming from step %d (%s); settings changed since the run started (then -> now): %s",
        cfg.resume,
        step,
        path.name,
        _changes_since(folder, cfg),
    )
    return path, step


def _log_not_resumed(cfg: DictConfig, run_dir: Path) -> None:
    """resume=auto found no interrupted run of this config: say so, and name the newest interrupted runs of other
    settings beside it, with what differs and how to continue one (any changed setting makes another config id)."""
    short_id = fingerprint(cfg)[:8]
    log.info("resume=auto: no interrupted run of this config (id %s) under %s", short_id, run_dir.parent)
    others = [d for d in interrupted_runs(run_dir.parent) if not d.name.endswith(f"_{short_id}")]
    for other in others[:SHOWN_OTHERS]:
        log.warning(
            "resume=auto: %s (an interrupted run, last.ckpt at step %s) has other settings (then -> now): %s; "
            "resume=%s continues it with the current ones",
            other,
            read_step(other / LAST),
            _changes_since(other, cfg),
            other,
        )


def resume_advice(run_dir: str | Path) -> str:
    """What to do after a run stopped on a non-finite loss, true to what its folder holds: the step last.ckpt keeps
    and ``resume=<run dir>`` (which continues with changed settings; resume=auto would start a new run, as a lower
    lr is another config), or that no checkpoint was saved before the failure."""
    last = Path(run_dir) / LAST
    step = read_step(last)
    if not isinstance(step, int):
        return (
            f"no checkpoint was saved before it ({last}: {step}; last.ckpt is written every checkpoint_every "
            "steps): lower lr, check the data, or use a higher-precision setting, then start the run again"
        )
    return (
        f"{last} holds step {step} (the last good state): lower lr, check the data, or use a "
        f"higher-precision setting, then rerun with resume={run_dir} (it continues with the changed settings)"
    )


def run_id(folder: str) -> str:
    """A wandb run id that is the same for a run folder and its resumption, and unique across sweeps."""
    return hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def wandb_offline() -> bool:
    """wandb logs offline (no account or network needed) unless WANDB_MODE=online says otherwise."""
    return os.environ.get("WANDB_MODE", "offline") != "online"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("lmlab.run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("lmlab.hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("lmlab.run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("lmlab.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("lmlab.basename", lambda p: Path(p).name, replace=True)
