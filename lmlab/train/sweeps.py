"""Sweeps: the multirun job wrapper, and the summary of a sweep folder (table, loss curves, best config).

A Hydra launcher stops the whole multirun at the first job that raises, so ``run_job`` catches the
error, records it in the job folder (``job_status.json``) and returns None, which the basic and
joblib launchers ignore and the optuna sweeper counts as a failed trial (NaN would crash it).
Everything in the summary is read back from the job folders (``.hydra/``, ``metrics.csv``,
``job_status.json``), never from wandb (offline wandb writes no summary), so
``python sweep.py summarize <dir>`` rebuilds it at any time, also while or after jobs ran elsewhere.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from matplotlib import colormaps
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

log = logging.getLogger("lmlab.train.sweeps")

STATUS_FILE = "job_status.json"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
CURVES_PNG = "sweep_curves.png"
WANDB_TAG_MAX = 64  # wandb rejects longer tags
CURVES = ("train/loss", "val/loss")
COLUMNS = [
    "job",
    "overrides",
    "status",
    "stage",
    "metric",
    "best_metric",
    "final_metric",
    "test_metric",
    "best_val_loss",
    "final_val_loss",
    "steps",
    "wall_s",
    "error",
]


# ---- the job ----------------------------------------------------------------------------------------------------


def run_job(cfg: DictConfig, task: Callable[[DictConfig], float | None]) -> float | None:
    """Run one multirun job; a failure is recorded in the job folder instead of ending the sweep."""
    _pin_ddp_relaunch()
    start, environ = time.time(), dict(os.environ)
    try:
        value, status, error = task(cfg), "ok", None
    except Exception as e:  # noqa: BLE001 - any failure of one job is recorded and the sweep goes on
        log.error("job failed:\n%s", traceback.format_exc())
        value, status, error = None, "failed", f"{type(e).__name__}: {e}"
    finally:
        _reset_distributed(environ)
    if value is not None and math.isnan(value):
        value = None
    _write_status(
        Path(cfg.paths.output_dir),
        {"status": status, "error": error, "value": value, "wall_s": round(time.time() - start, 2)},
    )
    return value


@rank_zero_only
def _write_status(job_dir: Path, status: dict[str, Any]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / STATUS_FILE).write_text(json.dumps(status, indent=1) + "\n")


def _pin_ddp_relaunch() -> None:
    """Make Lightning's DDP relaunch of ``sys.argv`` (ranks > 0) run this one job, in this job's folder.

    Lightning starts each extra rank as ``python <script> <sys.argv[1:]> hydra.run.dir=<HydraConfig run.dir>``.
    Left alone, a multirun's child would rerun the whole sweep (more folders, a hang). Here argv becomes this
    job's own overrides in RUN mode, and run.dir this job's folder.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def _reset_distributed(environ: dict[str, str]) -> None:
    """Undo a DDP job's traces so the next job in this process launches its own ranks.

    Lightning leaves LOCAL_RANK, MASTER_PORT, ... in os.environ (the next Trainer would take its ranks as already
    started and wait for them) and the process group open until exit.
    """
    os.environ.clear()
    os.environ.update(environ)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wandb_tags(*items: Any) -> list[str]:
    """Resolver ``lmlab.wandb_tags``: strings and lists (e.g. the job's overrides) as tags cut to wandb's limit."""
    flat = [x for item in items for x in (item if isinstance(item, (list, ListConfig)) else [item])]
    return [str(x)[:WANDB_TAG_MAX] for x in flat if str(x)]


def register_sweep_resolvers() -> None:
    OmegaConf.register_new_resolver("lmlab.wandb_tags", wandb_tags, replace=True)


# ---- reading a sweep folder --------------------------------------------------------------------------------------


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those with a Hydra config), in job-number order."""
    dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "config.yaml").is_file()]
    return sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv as rows of the cells that hold a value (train and validation rows log different columns)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(f)]


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric."""
    pairs = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def read_job(job_dir: Path) -> dict[str, Any]:
    """One summary row: overrides, status, best/final of the stage's metric (and its test value where the stage tests
    its best checkpoint, e.g. classify's test/acc) and of val/loss, steps, wall time."""
    config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    status_file = job_dir / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.is_file() else {"status": "unknown"}
    monitor, mode = config["stage"]["monitor"], config["stage"]["monitor_mode"]
    pick = min if mode == "min" else max
    metrics = read_metrics(job_dir / "metrics.csv")
    _, values = series(metrics, monitor)
    _, tested = series(metrics, monitor.replace("val/", "test/", 1))  # a stage that tests its best checkpoint
    _, val_loss = series(metrics, "val/loss")
    train_steps, _ = series(metrics, "train/loss")
    return {
        "job": job_dir.name,
        "all_overrides": yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else [],
        "status": status["status"],
        "stage": config["stage"]["name"],
        "metric": monitor,
        "mode": mode,
        "best_metric": pick(values) if values else None,
        "final_metric": values[-1] if values else None,
        "test_metric": tested[-1] if tested else None,
        "best_val_loss": min(val_loss) if val_loss else None,
        "final_val_loss": val_loss[-1] if val_loss else None,
        "steps": int(train_steps[-1]) + 1 if train_steps else None,  # Lightning logs step k after k+1 steps
        "wall_s": status.get("wall_s"),
        "error": status.get("error"),
        "dir": job_dir,
        "metrics": metrics,
    }


def read_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of all jobs, each with ``overrides``: those that differ between jobs; and the overrides all share."""
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    shared = [o for o in (rows[0]["all_overrides"] if rows else []) if all(o in r["all_overrides"] for r in rows)]
    for row in rows:
        row["overrides"] = " ".join(o for o in row["all_overrides"] if o not in shared or len(rows) == 1)
    return rows, shared


def best_job(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished job with the best value of the stage's metric (None when jobs' stages or metrics differ)."""
    done = [r for r in rows if r["status"] == "ok" and r["best_metric"] is not None]
    if not done or len({(r["stage"], r["metric"], r["mode"]) for r in done}) > 1:
        return None
    pick = min if done[0]["mode"] == "min" else max
    return pick(done, key=lambda r: r["best_metric"])


# ---- writing the summary ------------------------------------------------------------------------------------------


def plot_curves(rows: list[dict[str, Any]]) -> Figure:
    """Train and val loss against step, one colour per job (the seeds' run-comparison figures)."""
    fig = Figure(figsize=(12, 5), layout="constrained")  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(1, 2)
    colours = colormaps["tab10" if len(rows) <= 10 else "tab20"]
    for i, row in enumerate(rows):
        label = f"{row['job']}: {row['overrides'] or '(no overrides)'}"
        for ax, key in zip(axes, CURVES, strict=True):
            steps, values = series(row["metrics"], key)
            ax.plot(steps, values, color=colours(i % colours.N), label=label, marker="." if len(steps) < 20 else None)
    for ax, key in zip(axes, CURVES, strict=True):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    return fig


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def write_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write sweep_summary.{csv,md} and sweep_curves.png into the sweep folder from its job folders; return the rows."""
    sweep_dir = Path(sweep_dir)
    rows, shared = read_sweep(sweep_dir)
    best = best_job(rows)
    with open(sweep_dir / SUMMARY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"Every job: `{' '.join(shared) or '(no common overrides)'}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} jobs finished.", "", "## Best", "", _best_text(best)]
    lines += ["", f"![loss curves]({CURVES_PNG})", ""]
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines))
    plot_curves(rows).savefig(sweep_dir / CURVES_PNG, dpi=100)
    return rows


def sweep_report(sweep_dir: str | Path) -> str:
    """Write the summary and return what to print: where it is, failed jobs, the best job and its config."""
    sweep_dir = Path(sweep_dir)
    rows = write_summary(sweep_dir)
    failed = [
        f"  job {r['job']} ({r['overrides']}): {r['status']} {r['error'] or ''}" for r in rows if r["status"] != "ok"
    ]
    lines = [f"sweep summary: {sweep_dir / SUMMARY_MD} ({len(rows)} jobs)"]
    lines += [f"{len(failed)} jobs did not finish:", *failed] if failed else []
    return "\n".join([*lines, "best: " + _best_text(best_job(rows))])


def _best_text(best: dict[str, Any] | None) -> str:
    if best is None:
        return "No best job: none finished with a value of its metric, or the jobs train different stages or metrics."
    return (
        f"Job {best['job']} ({best['overrides'] or 'no overrides'}): best {best['metric']} = "
        f"{best['best_metric']:.6g}\n\nConfig: {best['dir'] / '.hydra' / 'config.yaml'}\n\n"
        f"Rerun it alone (a one-job sweep): `python sweep.py {' '.join(best['all_overrides'])}`"
    )


class SweepSummary(Callback):
    """Hydra callback (conf/sweep.yaml ``hydra.callbacks``): the summary of the sweep folder when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            print(sweep_report(sweep_dir))
