"""Every conf/experiment recipe composes, and its settings win over train.yaml's aliases and the groups."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_settings_override_the_defaults(name):
    recipe = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=False)
    scalars = {k: v for k, v in recipe.items() if k != "defaults" and not isinstance(v, dict)}
    assert scalars, f"{name} sets no top-level alias"
    for key, value in scalars.items():  # e.g. lr, max_steps: a recipe that loses these to train.yaml is wrong
        assert cfg[key] == value, f"experiment={name}: {key}={cfg[key]!r}, the recipe says {value!r}"
    for group in (d for d in recipe.get("defaults", []) if isinstance(d, dict)):
        ((key, choice),) = group.items()
        if key.startswith("override /model"):
            assert cfg.model.name == choice
