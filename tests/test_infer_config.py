"""The inference CLIs (eval.py, generate.py, chat.py, serve.py, predict.py) share one config, conf/infer/base.yaml.

Its keys (run, device, dtype) and its Hydra settings (no output folder, no logging setup) are declared there once
and no CLI's own file re-declares them, so the five files cannot drift back into copies of the same block.
"""

from __future__ import annotations

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CLIS = ("eval", "generate", "chat", "serve", "predict")
BASE = REPO / "conf" / "infer" / "base.yaml"
DOCUMENTED = {"run": "???", "device": "auto", "dtype": "auto"}  # README, base.yaml


def shared_keys() -> set[str]:
    return set(OmegaConf.load(BASE)) - {"defaults", "hydra"}


def composed(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, return_hydra_config=True)


def test_the_shared_config_holds_the_documented_defaults():
    base = OmegaConf.load(BASE)
    assert shared_keys() == set(DOCUMENTED)
    assert OmegaConf.to_container(OmegaConf.masked_copy(base, list(DOCUMENTED))) == DOCUMENTED


@pytest.mark.parametrize("name", CLIS)
def test_each_cli_composes_the_shared_keys_at_the_root(name):
    cfg = composed(name)
    assert OmegaConf.is_missing(cfg, "run")  # run= is required, in every CLI
    expected = {key: value for key, value in DOCUMENTED.items() if key != "run"}
    assert {key: cfg[key] for key in expected} == expected
    assert "init_from" not in cfg  # a run folder is run= here; init_from= is train.py's
    assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
    assert cfg.hydra.runtime.choices["hydra/job_logging"] == "disabled"
    assert cfg.hydra.runtime.choices["hydra/hydra_logging"] == "disabled"


@pytest.mark.parametrize("name", CLIS)
def test_no_cli_file_redeclares_a_shared_key(name):
    own = OmegaConf.load(REPO / "conf" / f"{name}.yaml")
    assert not shared_keys() & set(own), f"conf/{name}.yaml repeats keys of conf/infer/base.yaml"
    assert "hydra" not in own, f"conf/{name}.yaml: the hydra settings live in conf/infer/base.yaml"
    defaults = [entry if isinstance(entry, str) else next(iter(entry)) for entry in own.defaults]
    assert defaults[0] == "infer/base" and defaults[-1] == "_self_"  # the CLI's own values win over the shared ones
    assert not [entry for entry in defaults if "hydra/" in entry], f"conf/{name}.yaml: logging is set in base.yaml"
