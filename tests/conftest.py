"""Shared helpers: compose the real Hydra config with tiny overrides, run the real entry points."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one worker per core (pytest -n 2): one torch thread each, here and in the entry points the
    # tests start as subprocesses; two workers with a thread per core each spin-wait on each other (DPO's learning
    # test took 7x longer than alone)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Tiny, quick settings every test run starts from.
TINY = [
    "model=llama-tiny",
    "logger=csv",
    "max_steps=30",
    "batch_size=8",
    "seq_len=64",
    "warmup_steps=5",
    "trainer.val_check_interval=15",
    "trainer.limit_val_batches=2",
    "trainer.enable_model_summary=false",
    "generation.max_new_tokens=4",
    "bpe.vocab_size=512",
]


def sample_tenth(*files: str) -> str:
    """A ``data.train_files=`` override: a seeded tenth of the training records of each bundled sample file
    (data/sample/<file>, weight 0.1 in datamodules/sources.py; validation stays the usual held-out share of all of
    them). For runs whose assertions do not depend on the amount of data: tokenizing the whole sample (seconds) is
    most of a short run."""
    entries = ",".join(f"{{path:'{REPO / 'data' / 'sample' / name}',weight:0.1}}" for name in files)
    return f"data.train_files=[{entries}]"


# sample_tenth of data=sample_text's and data=sample_sft's files (stage=pretrain's and stage=sft's default data)
TEXT_TENTH = sample_tenth("pretrain_en.txt", "pretrain_zh.txt")
SFT_TENTH = sample_tenth("sft_alpaca.jsonl", "sft_chat.jsonl")


def compose_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """The composed training config, writing into tmp_path (no Hydra run dir needed)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*TINY, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", *overrides]
        )


@contextmanager
def hydra_job(config_name: str, overrides: list[str]) -> Iterator[DictConfig]:
    """The config ``python <entry point> <overrides>`` hands its task function (conf/<config_name>.yaml composed),
    with Hydra's runtime settings in place as @hydra.main leaves them (``${hydra:runtime.choices.data}``,
    ``HydraConfig.get()``) until the block ends. ``<entry point>.main(cfg)`` then runs the task in this process
    (Hydra passes a given config straight through): for tests of what a task does, where the command line is not
    the subject; tests/test_cli.py and the tests that run an entry point with :func:`run_script` cover that."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra's run_job hands it over
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def run_script(
    *args: str, cwd: Path = REPO, timeout: int = 300, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run an entry point (train.py, sweep.py, generate.py, ...) as a user would, ``input`` on its stdin."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# What a test of one datamodule tells it through connect unless the test says otherwise (a run's come from
# train.connect_data): the defaults the constructors had for these before they moved to connect.
RUN = {"arch": "causal", "max_length": 512, "batch_size": 8, "seed": 0}


def connect(dm, tokenizer, **run):
    """``dm.connect(tokenizer, ...)`` with :data:`RUN` updated by ``run``; returns ``dm``."""
    dm.connect(tokenizer, **{**RUN, **run})
    return dm


TINY_TEXTS = ["Add the two numbers. 3 + 4 = 7", "What is 5 plus 6? It is 11.", "你好，世界。三加四等于七。"] * 20


_TRAINED_BPE: dict = {}  # level -> the tokenizer tiny_bpe trained once in this process


def tiny_bpe(level: str):
    """A BPE of conf/bpe/<level>.yaml with a 400-token vocabulary, trained on TINY_TEXTS, chatml template.

    Trained once per process and level (training is deterministic); each call gets a deep copy of its own (the
    Rust tokenizer too), so a test that changes its tokenizer (template, special tokens, truncation) changes no other
    test's."""
    if level not in _TRAINED_BPE:
        from lmlab.core.tokenizer import train_bpe

        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"bpe={level}"])
        _TRAINED_BPE[level] = train_bpe(
            TINY_TEXTS, **{**cfg.bpe, "vocab_size": 400}, chat_template=cfg.template.chat_template
        )
    return copy.deepcopy(_TRAINED_BPE[level])


@pytest.fixture
def tiny_tokenizer():
    """A byte-level BPE trained on a few lines, with the chatml template."""
    return tiny_bpe("byte")


@pytest.fixture
def tiny_char_tokenizer():
    """The same at char level (SentencePiece-style "▁" pieces, NFKC, unk for characters it never saw)."""
    return tiny_bpe("char")


@pytest.fixture(scope="module")
def addition_pairs(tmp_path_factory):
    """DPO pairs a+b=: the right sum chosen, a wrong one rejected (tests use the train file as the val file too)."""
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    rows = [
        {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + (1 if (a + b) % 2 else -1))}
        for a in range(10)
        for b in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels built by hand from known prompt/response texts.

    The ids are the whole text's encoding (what inference sees). Segment k owns the tokens between the
    encodings of the text up to segment k-1 and up to segment k; each such prefix encoding must be the start of
    the whole encoding (no token crosses a segment boundary in the texts the tests use), which is checked.
    """
    from lmlab.core.collate import IGNORE_INDEX

    ids = tokenizer.encode("".join(text for text, _ in segments), add_special_tokens=False)
    labels, prefix = [], ""
    for text, is_response in segments:
        prefix += text
        upto = tokenizer.encode(prefix, add_special_tokens=False)
        assert upto == ids[: len(upto)], f"a token crosses the end of segment {text!r}"
        labels += ids[len(labels) : len(upto)] if is_response else [IGNORE_INDEX] * (len(upto) - len(labels))
    return ids, labels


def template(name: str) -> str:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"template={name}"]).template.chat_template


def greedy(**overrides) -> dict:
    """conf/generation/greedy.yaml as generate_texts receives it, with ``overrides`` (e.g. max_new_tokens)."""
    return {**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "generation" / "greedy.yaml")), **overrides}
