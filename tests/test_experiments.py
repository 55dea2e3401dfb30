"""Every conf/experiment recipe composes, its settings win over train.yaml's aliases and the groups, and its CPU-size
*_tiny variant trains."""

from __future__ import annotations

import copy
import csv
import functools

import pytest
import yaml
from conftest import REPO, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
TINY = [name for name in EXPERIMENTS if name.endswith("_tiny")]
FULL = [name for name in EXPERIMENTS if not name.endswith("_tiny")]


@functools.cache
def _composed(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}"], return_hydra_config=False)


def compose_experiment(name: str):
    """experiment=<name> composed over train.yaml: composed once per name in this process (each recipe is read by
    two tests and each *_tiny by a third), a copy of its own for each caller."""
    return copy.deepcopy(_composed(name))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_settings_override_the_defaults(name):
    recipe = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    cfg = compose_experiment(name)
    scalars = {k: v for k, v in recipe.items() if k != "defaults" and not isinstance(v, dict)}
    assert scalars or name in TINY, f"{name} sets no top-level alias"  # a tiny variant may only swap groups
    for key, value in scalars.items():  # e.g. lr, max_steps: a recipe that loses these to train.yaml is wrong
        if value == "???":  # OmegaConf's merge keeps train.yaml's value over a ???: it would not be required
            assert OmegaConf.is_missing(cfg, key), f"experiment={name}: {key}: ??? does not override {cfg[key]!r}"
        else:
            assert cfg[key] == value, f"experiment={name}: {key}={cfg[key]!r}, the recipe says {value!r}"
    for group in (d for d in recipe.get("defaults", []) if isinstance(d, dict)):
        ((key, choice),) = group.items()
        if key.startswith("override /model"):
            assert cfg.model.name == choice


@pytest.mark.parametrize("name", FULL)
def test_every_recipe_has_a_cpu_sized_tiny_variant(name):
    assert f"{name}_tiny" in TINY
    full, tiny = compose_experiment(name), compose_experiment(f"{name}_tiny")
    assert tiny.stage.name == full.stage.name and tiny.model.arch == full.model.arch
    assert tiny.template.name == full.template.name
    assert tiny.model.name.endswith("-tiny") and tiny.trainer.accelerator == "cpu" and 0 < tiny.max_steps <= 10
    # bundled data, no ../shared/data needed (an entry is a path or a {path, weight} mapping)
    assert all("/data/sample/" in (f if isinstance(f, str) else f.path) for f in tiny.data.train_files)
    assert tiny.init_from is None


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Every *_tiny recipe as a job of one sweep, two at a time (the joblib launcher)."""
    tmp = tmp_path_factory.mktemp("experiments")
    run_script(
        "sweep.py",
        f"experiment={','.join(TINY)}",
        "max_steps=2",
        "logger=csv",
        "sweep_name=experiments",
        "hydra/launcher=parallel",
        f"hydra.sweep.dir={tmp}/sweep",
        f"paths.cache_dir={tmp}/cache",
        timeout=600,
    )
    with open(tmp / "sweep" / "sweep_summary.csv", newline="") as f:
        return tmp / "sweep", {r["overrides"].removeprefix("experiment="): r for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_variant_trains_and_exports(tiny_runs, name):
    sweep_dir, rows = tiny_runs
    row = rows[name]
    assert row["status"] == "ok", row["error"]
    assert int(row["steps"]) == 2 and float(row["final_val_loss"]) > 0
    assert (sweep_dir / row["job"] / "hf" / "config.json").is_file()
    if row["stage"] == "classify":  # the summary carries the test value of the stage's metric from metrics.csv
        with open(sweep_dir / row["job"] / "metrics.csv", newline="") as f:
            tested = [r["test/acc"] for r in csv.DictReader(f) if r.get("test/acc")]
        assert tested and float(row["test_metric"]) == float(tested[-1])
    else:
        assert row["test_metric"] == ""
