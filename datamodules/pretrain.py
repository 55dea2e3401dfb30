"""Pretraining data: text tokenized once into uint16/uint32 token shards, read as windows of seq_len+1.

The shards live in a cache folder keyed by a hash of the tokenizer, the input files
(path, size, mtime) and the settings that change their bytes (not ``num_proc``), so a second
run with the same inputs reuses them; ``meta.json``, written last, marks the folder complete
and records the tokenizer hash, dtype, token/document/shard counts, sources and skips.
Tokenization runs in ``num_proc`` processes, resumes from the shards a crashed run left,
and gives the same bytes whatever ``num_proc`` (see datamodules/shards.py).

For an encoder-decoder (``arch: seq2seq``) each window becomes a T5 span-corruption pair:
the window with random spans replaced by sentinel tokens is the encoder input, the spans
after their sentinels are the decoder's labels (datamodules/span_corruption.py).

Documents are separated by EOS. Documents go to train or val by a seeded hash of their
position when no val file is given. Empty documents: a blank line of a txt file separates
documents and is not one; an empty or missing text field of a record is a bad record (an
error naming file, line and field, or under on_error=skip a count in meta.json).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import LMDataModule
from datamodules.formats import SkipCounter, to_text
from datamodules.shards import SPLITS, ShardWriter, plan_shards, token_dtype
from datamodules.span_corruption import SpanCorruption, sentinel_token_ids
from lmlab.tokenizer import corpus_bytes

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Contiguous, non-overlapping windows of seq_len+1 tokens over the concatenation of token shard files.

    A window may span two shards, so the windows are the same however the tokens were sharded.
    Windows are read with ``np.fromfile`` at an offset rather than through open memmaps, so a
    corpus of thousands of shards holds no file descriptors and pickles cheaply to loader workers.
    """

    def __init__(self, paths: Sequence[str | Path], dtype: np.dtype, seq_len: int):
        self.paths = [str(path) for path in paths]
        self.dtype = np.dtype(dtype)
        self.offsets = np.cumsum([0] + [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]).tolist()
        self.seq_len = seq_len
        if self.offsets[-1] < seq_len + 1:
            where = Path(self.paths[0]).parent if self.paths else "no shards"
            raise ValueError(f"{where}: {self.offsets[-1]} tokens, fewer than one window of seq_len+1={seq_len + 1}")

    def __len__(self) -> int:
        return (self.offsets[-1] - 1) // self.seq_len

    def _tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the concatenated shards."""
        parts = []
        k = bisect.bisect_right(self.offsets, start) - 1
        while start < end:
            stop = min(end, self.offsets[k + 1])
            offset = (start - self.offsets[k]) * self.dtype.itemsize
            parts.append(np.fromfile(self.paths[k], dtype=self.dtype, count=stop - start, offset=offset))
            start, k = stop, k + 1
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(self._tokens(start, start + self.seq_len + 1).astype(np.int64))
        return {"input_ids": window, "labels": window}


class PretrainDataModule(LMDataModule):
    """Plain text (txt lines, or a text field of jsonl/json/parquet/csv): next-token prediction or span corruption."""

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
        num_proc: int = 0,
        shard_mb: float = 8,
        chunk_chars: int = 100_000,
        arch: str = "causal",
        span_corruption: dict | None = None,
    ):
        super().__init__(train_files, val_files, val_fraction, format, batch_size, num_workers, pad_to_multiple_of,
                         seed, on_error, arch)
        if arch == "seq2seq" and not span_corruption:
            raise ValueError("pretraining an encoder-decoder on plain text needs data.span_corruption "
                             "(noise_density, mean_span_length)")
        self.span_corruption = span_corruption
        self.text_field = text_field
        self.seq_len = seq_len
        self.cache_dir = Path(cache_dir)
        self.num_proc = num_proc
        self.shard_mb = shard_mb
        self.chunk_chars = chunk_chars

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

    def _settings(self) -> dict:
        """Everything besides the input files that the token bytes depend on."""
        return {
            "tokenizer_sha256": hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
            "vocab_size": len(self.tokenizer), "eos_id": self.tokenizer.eos_token_id, "format": self.format,
            "text_field": self.text_field, "val_fraction": self.val_fraction, "seed": self.seed,
            "on_error": self.on_error, "shard_mb": self.shard_mb, "chunk_chars": self.chunk_chars,
        }

    def cache_key(self) -> str:
        """Hash of everything the token files depend on."""
        h = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        for path in self.train_files + ["--val--"] + self.val_files:
            stat = os.stat(path) if os.path.exists(path) else None
            h.update(f"{os.path.abspath(path)}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @property
    def token_dir(self) -> Path:
        return self.cache_dir / self.cache_key()

    def prepare_data(self) -> None:
        """Tokenize every document once into shards; meta.json, written last, marks them complete.

        A rerun after a crash keeps the finished shards and tokenizes only the missing ones.
        """
        target = self.token_dir
        if (target / "meta.json").exists():
            meta = json.loads((target / "meta.json").read_text())
            self.skips = SkipCounter(Counter(meta["skipped"]), list(meta["skip_examples"]))
            log.info("pretrain data: reusing token shards in %s", target)
            return
        if self.tokenizer.eos_token_id is None:
            raise ValueError("pretraining separates documents with EOS; the tokenizer has no eos token")
        self.skips = SkipCounter()  # this pass only: training a tokenizer may have read (and counted) the data before
        settings = self._settings()
        writer = ShardWriter(target, self.tokenizer.backend_tokenizer, settings["eos_id"],
                             token_dtype(settings["vocab_size"]), self.num_proc, self.chunk_chars)
        shards = writer.write(plan_shards(self._split_docs(), int(self.shard_mb * 1e6)),
                              total_bytes=corpus_bytes(self.train_files + self.val_files))
        meta = {
            **settings,
            "dtype": writer.dtype.name,
            "tokens": {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in SPLITS},
            "documents": {split: sum(s["documents"] for s in shards if s["split"] == split) for split in SPLITS},
            "shards": shards,
            "sources": {split: [{"path": p, "bytes": os.path.getsize(p)} for p in files]
                        for split, files in (("train", self.train_files), ("val", self.val_files))},
            "skipped": dict(sorted(self.skips.skipped.items())),
            "skip_examples": self.skips.first_errors,
        }
        tmp = target / f"meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, target / "meta.json")
        log.info("pretrain data: %s tokens, %s documents in %d shards", meta["tokens"], meta["documents"], len(shards))
        self.log_skips()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        meta = json.loads((self.token_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        self.train_set, self.val_set = (
            TokenWindows([self.token_dir / s["file"] for s in meta["shards"] if s["split"] == split], dtype, self.seq_len)
            for split in SPLITS
        )
        if self.arch == "seq2seq":
            sentinels = sentinel_token_ids(self.tokenizer)
            self.train_set, self.val_set = (
                SpanCorruption(windows, sentinels, self.tokenizer.eos_token_id, seed=self.seed, **self.span_corruption)
                for windows in (self.train_set, self.val_set)
            )

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """Causal: the first tokens of validation windows. Seq2seq: corrupted windows and their span targets."""
        items = [self.val_set[i] for i in range(min(n, len(self.val_set)))]
        if self.arch == "seq2seq":  # the encoder input's final EOS is added again when the prompt is encoded
            return [(self.tokenizer.decode(x["input_ids"][:-1]), self.tokenizer.decode(x["labels"], skip_special_tokens=True))
                    for x in items]
        return [(self.tokenizer.decode(x["input_ids"][:min(16, self.seq_len)]), None) for x in items]
