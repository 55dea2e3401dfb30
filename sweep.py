"""Sweep: `python sweep.py -m lr=5e-5,5e-6 batch_size=5,10` runs one training job per combination.

The same config tree and task as train.py (conf/sweep.yaml adds conf/train.yaml) in Hydra's multirun
mode, so `-m` is optional. Named grids: `python sweep.py sweep=sft_lr_batch` (conf/sweep/). Jobs land in
multirun/<date>_<time>_<sweep_name>/<job number>/, each a full run folder and its own wandb run, all in
one wandb group named after the sweep folder. A failed job is recorded and the others go on; when the
multirun ends, the sweep folder gets sweep_summary.{md,csv} and sweep_curves.png (lmlab/train/sweeps.py), and
`python sweep.py summarize <sweep folder>` rebuilds them later.
"""

from __future__ import annotations

import argparse
import sys

import hydra
from omegaconf import DictConfig

from lmlab.train.sweeps import register_sweep_resolvers, run_job, sweep_report
from train import run

register_sweep_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    register_sweep_resolvers()  # again: joblib and submitit workers unpickle this function without running the module
    return run_job(cfg, run)


def summarize(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sweep.py summarize", description="Rebuild a sweep folder's summary.")
    parser.add_argument("sweep_dir", help="multirun/<date>_<time>_<name>")
    print(sweep_report(parser.parse_args(argv).sweep_dir))


if __name__ == "__main__":
    if sys.argv[1:2] == ["summarize"]:
        summarize(sys.argv[2:])
    else:
        main()
