"""Prepare data once, before training.

    python prepare.py task=tokenizer data=zh_wiki bpe.vocab_size=6400     # train and save a tokenizer
    python prepare.py task=tokenize data=zh_wiki tokenizer=<dir>           # tokenize a corpus into token files
    python prepare.py task=split data=sms_spam                            # write a classification set's splits

Both read the data preset's training files through its datamodule (so formats, field mapping
and on_error behave as in training). Token files land in the data cache that train.py reuses.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lmlab.core.runs import register_resolvers
from lmlab.core.tokenizer import load_tokenizer, train_and_save
from train import connect_data

log = logging.getLogger("lmlab.prepare")
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()


def train_tokenizer(cfg: DictConfig) -> Path:
    """Train a BPE on the preset's training text; save it as a Hugging Face tokenizer folder with its report.json."""
    datamodule = instantiate(cfg.data)
    tokenizer, report = train_and_save(datamodule, cfg.out, cfg.template.chat_template, cfg.bpe)
    print(json.dumps(report, indent=2))
    log.info(
        "saved tokenizer (%d tokens) and report.json to %s; %s", len(tokenizer), cfg.out, datamodule.skips.report()
    )
    return Path(cfg.out)


def tokenize_corpus(cfg: DictConfig) -> Path:
    """Tokenize the preset's corpus into the token shards a pretraining run reads (data.num_proc processes).

    Rerun the same command after an interruption: finished shards are kept and only the rest is tokenized.
    """
    if not cfg.tokenizer:
        raise ValueError("task=tokenize needs tokenizer=<dir> (make one with task=tokenizer)")
    datamodule = instantiate(cfg.data)
    connect_data(cfg, datamodule, load_tokenizer(cfg.tokenizer))  # as train.py: the same cache key, the same shards
    datamodule.prepare_data()
    meta = json.loads((datamodule.token_dir / "meta.json").read_text())
    log.info(
        "%s tokens (%s), %s documents in %d shards in %s; %s",
        meta["tokens"],
        meta["dtype"],
        meta["documents"],
        len(meta["shards"]),
        datamodule.token_dir,
        datamodule.skips.report(),
    )
    return datamodule.token_dir


def write_splits(cfg: DictConfig) -> Path:
    """Write a classification preset's train/val/test splits as jsonl (the same seeded cut stage=classify makes).

    A backbone can then be pretrained on the training texts only, never on the test messages.
    """
    datamodule = instantiate(cfg.data)
    if not hasattr(datamodule, "write_splits"):
        raise ValueError(f"task=split needs a classification preset (data=sms_spam, ...), not data={cfg.data._target_}")
    for name, path in datamodule.write_splits(cfg.split_dir).items():
        log.info("%s: %d examples -> %s", name, len(datamodule.splits()[name]), path)
    return Path(cfg.split_dir)


PREPARE_TASKS = {"tokenizer": train_tokenizer, "tokenize": tokenize_corpus, "split": write_splits}


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    if cfg.task not in PREPARE_TASKS:
        raise ValueError(f"task={cfg.task!r}: choose one of {sorted(PREPARE_TASKS)}")
    PREPARE_TASKS[cfg.task](cfg)


if __name__ == "__main__":
    main()
