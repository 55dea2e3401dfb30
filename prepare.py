"""Prepare data once, before training.

    python prepare.py task=tokenizer data=zh_wiki bpe.vocab_size=6400     # train and save a tokenizer
    python prepare.py task=tokenize data=zh_wiki tokenizer=<dir>           # tokenize a corpus into token files

Both read the data preset's training files through its datamodule (so formats, field mapping
and on_error behave as in training). Token files land in the data cache that train.py reuses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lmlab.runs import register_resolvers
from lmlab.tokenizer import load_tokenizer, train_bpe

log = logging.getLogger("lmlab.prepare")
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()


def train_tokenizer(cfg: DictConfig) -> Path:
    """Train a BPE on the preset's training text and save it as a Hugging Face tokenizer folder."""
    datamodule = instantiate(cfg.data)
    tokenizer = train_bpe(datamodule.iter_texts(), chat_template=cfg.template.chat_template, **cfg.bpe)
    out = Path(cfg.out)
    tokenizer.save_pretrained(out)
    log.info("saved tokenizer (%d tokens) to %s; %s", len(tokenizer), out, datamodule.skips.report())
    return out


def tokenize_corpus(cfg: DictConfig) -> Path:
    """Tokenize the preset's corpus into the token files a pretraining run reads."""
    if not cfg.tokenizer:
        raise ValueError("task=tokenize needs tokenizer=<dir> (make one with task=tokenizer)")
    datamodule = instantiate(cfg.data)
    datamodule.tokenizer = load_tokenizer(cfg.tokenizer)
    datamodule.prepare_data()
    log.info("token files in %s", datamodule.token_dir)
    return datamodule.token_dir


TASKS = {"tokenizer": train_tokenizer, "tokenize": tokenize_corpus}


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}: choose one of {sorted(TASKS)}")
    TASKS[cfg.task](cfg)


if __name__ == "__main__":
    main()
