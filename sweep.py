"""Sweep: `python sweep.py -m lr=5e-5,5e-6 batch_size=5,10` runs one training job per combination.

The same config tree as train.py (conf/sweep.yaml adds conf/train.yaml) in Hydra's multirun
mode, so `-m` is optional; jobs land in multirun/<date>_<time>_<stage>_<model>/<job number>/,
each a full run folder and its own wandb run, all in one wandb group named after the sweep.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
