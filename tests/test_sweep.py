"""sweep.py as a user runs it: a 2 x 2 grid (a job per combination, each exported), its summary (numbers, curves,
best job), wandb runs, a failed job, DDP jobs, an optuna search (the joblib launcher runs in
tests/test_experiments.py)."""

from __future__ import annotations

import csv
import shutil

import pytest
import yaml
from conftest import REPO, TEXT_TENTH, run_script
from hydra import compose, initialize_config_dir
from matplotlib import colormaps
from PIL import Image

import sweep
from lmlab.train.sweeps import CURVES, plot_curves, read_metrics, read_sweep, series

pytestmark = pytest.mark.slow  # sweeps of real training jobs

# tiny jobs: 4 steps, validation after steps 2 and 4, every step's train loss logged, on a tenth of the bundled
# sample text (what the sweep tests check is each job's own numbers and files, whatever the data)
QUICK = [
    "model=llama-tiny",
    TEXT_TENTH,
    "max_steps=4",
    "seq_len=64",
    "warmup_steps=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "bpe.vocab_size=512",
    "callbacks.samples.num_prompts=0",
]


def summary_rows(sweep_dir):
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """`python sweep.py -m lr=5e-5,5e-6 batch_size=4,8` (+ tiny settings): 4 jobs, each its own wandb run (offline)."""
    tmp = tmp_path_factory.mktemp("grid")
    proc = run_script(
        "sweep.py",
        "-m",
        "lr=5e-5,5e-6",
        "batch_size=4,8",
        *QUICK,
        f"hydra.sweep.dir={tmp}/sweep",
        f"paths.cache_dir={tmp}/cache",
    )
    return tmp / "sweep", proc


def test_sweep_runs_one_job_per_value(grid):
    """A folder per job and nothing else, each job with its own values and its own hf/ export; Hydra says how many
    jobs it launches."""
    sweep_dir, proc = grid
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    values = [yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) for job in jobs]
    assert [(v["lr"], v["batch_size"]) for v in values] == [(5e-5, 4), (5e-5, 8), (5e-6, 4), (5e-6, 8)]
    assert all((job / "hf" / "model.safetensors").is_file() for job in jobs)
    assert "Launching 4 jobs" in proc.stdout + proc.stderr


def test_grid_makes_one_job_per_combination(grid):
    sweep_dir, _ = grid
    jobs = sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2", "3"]
    combos = {
        (c["lr"], c["batch_size"])
        for c in (yaml.safe_load((sweep_dir / j / ".hydra" / "config.yaml").read_text()) for j in jobs)
    }
    assert combos == {(5e-5, 4), (5e-5, 8), (5e-6, 4), (5e-6, 8)}


def test_summary_numbers_are_each_jobs_metrics(grid):
    sweep_dir, proc = grid
    stdout = proc.stdout
    rows = summary_rows(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["overrides"] for r in rows] == [
        "lr=5e-05 batch_size=4",
        "lr=5e-05 batch_size=8",
        "lr=5e-06 batch_size=4",
        "lr=5e-06 batch_size=8",
    ]  # only what differs between jobs
    for row in rows:
        with open(sweep_dir / row["job"] / "metrics.csv", newline="") as f:
            logged = list(csv.DictReader(f))
        val = [float(r["val/loss"]) for r in logged if r["val/loss"]]
        train_steps = [int(r["step"]) for r in logged if r["train/loss"]]
        assert len(val) == 2
        assert row["status"] == "ok" and row["stage"] == "pretrain" and row["metric"] == "val/loss"
        assert float(row["best_val_loss"]) == min(val) == float(row["best_metric"])
        assert float(row["final_val_loss"]) == val[-1] == float(row["final_metric"])
        assert int(row["steps"]) == train_steps[-1] + 1 == 4
        assert float(row["wall_s"]) > 0
    best = min(rows, key=lambda r: float(r["best_metric"]))
    assert f"best: Job {best['job']} ({best['overrides']})" in stdout  # the best config is printed
    assert f"{best['job']}/.hydra/config.yaml" in (sweep_dir / "sweep_summary.md").read_text()


def test_curves_png_overlays_every_job(grid):
    sweep_dir, _ = grid
    rows, _ = read_sweep(sweep_dir)
    fig = plot_curves(rows)  # what sweep_curves.png was drawn from
    for ax, key in zip(fig.axes, CURVES, strict=True):
        assert len(ax.lines) == 4
        for line, row in zip(ax.lines, rows, strict=True):
            steps, values = series(read_metrics(sweep_dir / row["job"] / "metrics.csv"), key)
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values and len(values) >= 2
    image = Image.open(sweep_dir / "sweep_curves.png").convert("RGB")
    assert image.size == (1200, 500)
    pixels = {colour for _, colour in image.getcolors(maxcolors=image.width * image.height)}
    for i in range(4):  # each job's colour is drawn
        colour = tuple(round(c * 255) for c in colormaps["tab10"](i)[:3])
        assert colour in pixels


def test_each_job_is_its_own_wandb_run_in_the_sweeps_group(grid):
    sweep_dir, _ = grid
    runs = [next((sweep_dir / j / "wandb").glob("offline-run-*")) for j in "0123"]
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 4  # four run ids
    record = next(runs[3].glob("*.wandb")).read_bytes()  # the run's header: group, name, tags
    assert sweep_dir.name.encode() in record
    assert b"batch_size=8,bpe.vocab_size=512" in record  # the readable name (hydra's override_dirname)
    assert b"lr=5e-06" in record and b"pretrain" in record


def test_summary_is_rebuilt_from_the_folder(grid, tmp_path, capsys):
    sweep_dir, _ = grid
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("sweep_summary.*", "sweep_curves.png"))
    sweep.summarize([str(copy)])  # python sweep.py summarize <dir>
    assert (copy / "sweep_curves.png").is_file() and "best: Job" in capsys.readouterr().out
    assert (copy / "sweep_summary.csv").read_text() == (sweep_dir / "sweep_summary.csv").read_text()


def test_failed_job_is_recorded_and_the_next_ddp_job_still_runs(tmp_path):
    """Two DDP jobs (2 CPU ranks, gloo): the first fails, the second launches its own ranks in its own folder."""
    proc = run_script(
        "sweep.py",
        "-m",
        "lr=-1,5e-3",
        *QUICK,
        "max_steps=2",
        "trainer.devices=2",
        "trainer.deterministic=false",
        "logger=csv",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.log_dir={tmp_path}/outputs",
    )
    failed, ok = summary_rows(tmp_path / "sweep")
    assert failed["status"] == "failed" and failed["error"] == "ValueError: Invalid learning rate: -1"
    assert failed["best_metric"] == "" and "1 jobs did not finish" in proc.stdout
    assert (
        ok["status"] == "ok" and int(ok["steps"]) == 2 and (tmp_path / "sweep" / "1" / "hf" / "config.json").is_file()
    )
    assert "best: Job 1 (lr=0.005)" in proc.stdout
    assert (proc.stdout + proc.stderr).count("MEMBER: 2/2") == 2  # each job started its second rank
    # the relaunched rank ran this one job in its folder: no run folder elsewhere, no extra job folders
    assert not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


def test_optuna_search_gets_each_jobs_metric(tmp_path):
    run_script(
        "sweep.py",
        "sweep=optuna",
        "hydra.sweeper.n_trials=2",
        *QUICK,
        "logger=csv",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"paths.cache_dir={tmp_path}/cache",
    )
    rows = summary_rows(tmp_path / "sweep")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(float(r["final_metric"]) for r in rows)  # the job returned it to optuna
    assert set(result["best_params"]) == {"lr", "batch_size", "beta", "optim.weight_decay"}
    assert 1e-6 <= result["best_params"]["lr"] <= 1e-3


def test_optuna_direction_follows_the_stages_metric():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for mode in ("min", "max"):
            cfg = compose("sweep", overrides=["sweep=optuna", f"stage.monitor_mode={mode}"], return_hydra_config=True)
            assert cfg.hydra.sweeper.direction == f"{mode}imize"


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_launcher_configs_compose(launcher):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "sweep",
            overrides=[
                f"hydra/launcher={launcher}",
                "hydra.launcher.partition=gpu" if launcher == "slurm" else "hydra.launcher.n_jobs=2",
            ],
            return_hydra_config=True,
        )
    launcher_cfg = cfg.hydra.launcher
    if launcher == "slurm":
        assert launcher_cfg.partition == "gpu" and launcher_cfg.tasks_per_node == launcher_cfg.gpus_per_node == 1
        assert launcher_cfg.timeout_min > 0 and "submitit" in launcher_cfg._target_
    else:
        assert launcher_cfg.n_jobs == 2 and "joblib" in launcher_cfg._target_
