"""Pretraining data: text tokenized once into uint16/uint32 memmap files, read as windows of seq_len+1.

The token files live in a cache folder keyed by a hash of the tokenizer, the input files
(path, size, mtime) and the split settings, so a second run with the same inputs reuses them.
Documents are separated by EOS. Documents go to train or val by a seeded hash of their
position when no val file is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import CausalDataModule
from datamodules.formats import to_text

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class TokenWindows(Dataset):
    """Contiguous, non-overlapping windows of seq_len+1 tokens from a 1-D memmap."""

    def __init__(self, path: str | Path, dtype: np.dtype, seq_len: int):
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than one window of seq_len+1={seq_len + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": window, "labels": window}


class PretrainDataModule(CausalDataModule):
    """Plain text (txt lines, or a text field of jsonl/json/parquet/csv) for next-token prediction."""

    def __init__(
        self,
        train_files: Sequence[str],
        val_files: Sequence[str] | None = None,
        val_fraction: float = 0.05,
        format: str = "auto",
        text_field: str = "text",
        seq_len: int = 256,
        cache_dir: str = ".cache/tokens",
        batch_size: int = 8,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        seed: int = 0,
        on_error: str = "raise",
        tokenize_batch: int = 1000,
    ):
        super().__init__(train_files, val_files, val_fraction, format, batch_size, num_workers, pad_to_multiple_of,
                         seed, on_error)
        self.text_field = text_field
        self.seq_len = seq_len
        self.cache_dir = Path(cache_dir)
        self.tokenize_batch = tokenize_batch

    def _docs(self, files: Sequence[str]) -> Iterator[str]:
        adapter = functools.partial(to_text, text_field=self.text_field)
        return (doc for _, _, doc in self.records(files, adapter))

    def _split_docs(self) -> Iterator[tuple[str, str]]:
        """(split, text) for every document: the val file's, or a seeded hash of the train file's."""
        for i, doc in enumerate(self._docs(self.train_files)):
            bucket = zlib.crc32(f"{self.seed}:{i}".encode()) % 10_000
            held_out = not self.val_files and bucket < self.val_fraction * 10_000
            yield ("val" if held_out else "train"), doc
        for doc in self._docs(self.val_files):
            yield "val", doc

    def iter_texts(self) -> Iterator[str]:
        return (doc for split, doc in self._split_docs() if split == "train")

    def cache_key(self) -> str:
        """Hash of everything the token files depend on."""
        h = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode())
        for path in self.train_files + ["--val--"] + self.val_files:
            stat = os.stat(path) if os.path.exists(path) else None
            h.update(f"{os.path.abspath(path)}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}".encode())
        h.update(f"{self.format}:{self.text_field}:{self.val_fraction}:{self.seed}:{self.on_error}".encode())
        return h.hexdigest()[:16]

    @property
    def token_dir(self) -> Path:
        return self.cache_dir / self.cache_key()

    def prepare_data(self) -> None:
        """Tokenize every document once; written to a temporary folder and renamed when complete."""
        target = self.token_dir
        if (target / "meta.json").exists():
            log.info("pretrain data: reusing token files in %s", target)
            return
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        dtype = token_dtype(len(self.tokenizer))
        eos = self.tokenizer.eos_token_id
        counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
        files = {split: open(tmp / f"{split}.bin", "wb") for split in counts}
        batch: list[tuple[str, str]] = []

        def flush() -> None:
            encoded = self.tokenizer([doc for _, doc in batch], add_special_tokens=False)["input_ids"]
            for (split, _), ids in zip(batch, encoded):
                np.asarray(ids + [eos], dtype=dtype).tofile(files[split])
                counts[split][0] += len(ids) + 1
                counts[split][1] += 1
            batch.clear()

        try:
            for item in self._split_docs():
                batch.append(item)
                if len(batch) >= self.tokenize_batch:
                    flush()
            if batch:
                flush()
        except BaseException:
            shutil.rmtree(tmp)  # no half-written token files left behind
            raise
        finally:
            for f in files.values():
                f.close()
        meta = {
            "dtype": dtype.name,
            "tokens": {k: v[0] for k, v in counts.items()},
            "documents": {k: v[1] for k, v in counts.items()},
            "sources": {"train": self.train_files, "val": self.val_files},
            "skipped": dict(self.skips.skipped),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if target.exists():  # another process finished first; its files are identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
        log.info("pretrain data: %s", meta["tokens"])
        self.log_skips()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        meta = json.loads((self.token_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        self.train_set = TokenWindows(self.token_dir / "train.bin", dtype, self.seq_len)
        self.val_set = TokenWindows(self.token_dir / "val.bin", dtype, self.seq_len)

    def sample_prompts(self, n: int) -> list[str]:
        """The first few tokens of validation windows, as text."""
        k = min(16, self.seq_len)
        return [self.tokenizer.decode(self.val_set[i]["input_ids"][:k]) for i in range(min(n, len(self.val_set)))]
