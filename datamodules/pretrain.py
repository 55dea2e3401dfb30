"""Pretraining data: text tokenized once into uint16/uint32 token shards, read as windows of seq_len+1.

The shards live in a cache folder keyed by a hash of the tokenizer, the input files
(path, size, mtime) and the settings that change their bytes (not ``num_proc`` or ``tokenize_engine``), so a second
run with the same inputs reuses them; ``meta.json``, written last, marks the folder complete
and records the tokenizer hash, dtype, token/document/shard counts, sources and skips.
Tokenization runs in ``num_proc`` processes, resumes from the shards a crashed run left,
and gives the same bytes whatever ``num_proc`` and ``tokenize_engine`` (see datamodules/shards.py).

For an encoder-decoder (``arch: seq2seq``) each window becomes a T5 span-corruption pair:
the window with random spans replaced by sentinel tokens is the encoder input, the spans
after their sentinels are the decoder's labels (datamodules/span_corruption.py).

Documents are separated by EOS. Documents go to train or val by a hash of their position
seeded with ``split_seed`` when no val file is given. Empty documents: a blank line of a txt
file separates documents and is not one; an empty or missing text field of a record is a bad
record (an error naming file, line and field, or under on_error=skip a count in meta.json).

Mixtures. ``train_files`` entries may carry a ``weight`` and a ``name`` (datamodules/sources.py):
a source's training documents go into the shards ``weight`` times (whole copies, then a seeded
sample for the fraction), its held-out documents once. One reading pass before tokenizing plans
this: it decides train or val for every document, drops exact duplicates across the whole
mixture (``dedupe``: a hash of the text with whitespace collapsed; the first occurrence is kept,
so a document cannot sit in both train and val), and counts everything for meta.json. The
documents are then read again to be tokenized (once per whole copy), so no source is ever held
in memory: the plan keeps a few integers per document. ``convert`` runs every document through
OpenCC first (``t2s``: traditional to simplified script), so both scripts share one vocabulary
and a poem in both scripts is one duplicate. With ``val_per_source`` every source keeps its own
validation set and LMModule logs ``val/loss/<name>`` next to ``val/loss`` over all of them.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import heapq
import importlib.metadata
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.base import LMDataModule
from datamodules.formats import DataError, SkipCounter, to_text
from datamodules.shards import SHARD_SPLITS, ShardWriter, make_encoder, plan_shards, token_dtype
from datamodules.sources import Source, weighted
from datamodules.span_corruption import SpanCorruption, sentinel_token_ids
from lmlab.core.files import write_atomically

log = logging.getLogger(__name__)


def dedupe_key(text: str) -> bytes:
    """What makes two documents exact duplicates: the same text once whitespace runs are collapsed (and trimmed)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def ascending_runs(positions: Sequence[int]) -> list[list[int]]:
    """``positions`` cut wherever they stop increasing: :func:`sources.weighted` gives whole copies, then a sorted
    sample, so each run is one read of the source."""
    runs: list[list[int]] = []
    for position in positions:
        if not runs or position <= runs[-1][-1]:
            runs.append([])
        runs[-1].append(position)
    return runs


@dataclass
class SourcePlan:
    """What one source puts in the shards, decided by one reading pass before anything is tokenized.

    Documents are named by their position among the documents the source yields, so a later read finds them again.
    ``train`` is already weighted (duplicate positions are copies); ``val`` never is: a held-out document counts once.
    """

    source: Source
    train: list[int]
    val: list[int]
    documents: int  # documents read
    duplicates: int  # exact duplicates of an earlier document of the mixture, dropped
    train_bytes: int  # UTF-8 bytes of the weighted training documents (about: the unique ones times the weight)
    val_bytes: int

    @property
    def label(self) -> str:
        return self.source.label


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
    """Plain text (txt lines, or a text field of jsonl/json/parquet/csv): next-token prediction or span corruption.

    ``train_files`` may be a weighted mixture of named sources; ``dedupe``, ``convert`` and ``val_per_source`` are
    described in the module docstring.
    """

    def __init__(
        self,
        train_files: Sequence[str | dict],
        val_files: Sequence[str] | None = None,
        val_fraction: float = 0.05,
        format: str = "auto",
        text_field: str = "text",
        cache_dir: str = ".cache/tokens",
        split_seed: int = 42,
        on_error: str = "raise",
        num_proc: int = 0,
        tokenize_engine: str = "auto",
        shard_mb: float = 8,
        chunk_chars: int = 100_000,
        span_corruption: dict | None = None,
        dedupe: bool = False,
        convert: str | None = None,
        val_per_source: bool = False,
    ):
        super().__init__(train_files, val_files, val_fraction, format, on_error, split_seed)
        self.val_sources = [Source(path) for path in self.val_files]  # a val file named like a source is its val set
        self.span_corruption = span_corruption
        self.text_field = text_field
        self.cache_dir = Path(cache_dir)
        self.num_proc = num_proc
        self.tokenize_engine = tokenize_engine
        self.shard_mb = shard_mb
        self.chunk_chars = chunk_chars
        self.dedupe = dedupe
        self.convert = convert
        self.converter = self._opencc(convert) if convert else None
        self.val_per_source = val_per_source
        self.val_sets: dict[str, Dataset] = {}
        self._plans: list[SourcePlan] | None = None
        self._plan_skips = SkipCounter()

    def connect(self, tokenizer: PreTrainedTokenizerBase, *, arch: str, **run) -> None:
        """:meth:`LMDataModule.connect`; an encoder-decoder needs the span corruption settings."""
        if arch == "seq2seq" and not self.span_corruption:
            raise ValueError(
                "pretraining an encoder-decoder on plain text needs data.span_corruption "
                "(noise_density, mean_span_length)"
            )
        super().connect(tokenizer, arch=arch, **run)

    @property
    def seq_len(self) -> int:
        """Tokens per window (read as seq_len + 1 for the shifted labels): the run's max length (connect)."""
        return self.max_length

    @staticmethod
    def _opencc(config: str):
        """An OpenCC converter (``t2s``, ``tw2s``, ``hk2s``, ...), made now so a bad name fails before any reading."""
        import opencc

        try:
            return opencc.OpenCC(config)
        except RuntimeError as e:
            raise ValueError(
                f"data.convert={config!r}: not an OpenCC configuration; e.g. t2s (traditional -> "
                f"simplified), tw2s, hk2s; or null for no conversion ({e})"
            ) from e

    def _source_docs(self, source: Source) -> Iterator[str]:
        """One source's documents in order, converted when ``convert`` is set."""
        adapter = functools.partial(to_text, text_field=self.text_field)
        for _, _, doc in self.records([source], adapter):
            yield self.converter.convert(doc) if self.converter else doc

    def _plan(self) -> list[SourcePlan]:
        """Read every source once: train or val by the seeded hash, duplicates dropped, training documents weighted.

        The held-out hash runs over the position among all training files' documents (duplicates included), as it
        did before mixtures, so a preset without duplicates keeps its split. Bad records are counted here; the later
        reads meet them again and leave the count alone (:meth:`_restore_skips`).
        """
        if self._plans is not None:
            return self._plans
        self.skips = SkipCounter()
        seen: set[bytes] = set()
        position = 0
        plans = []
        for source, is_val_file in [(s, False) for s in self.sources] + [(s, True) for s in self.val_sources]:
            train: list[int] = []
            val: list[int] = []
            sizes = {"train": 0, "val": 0}
            duplicates = documents = 0
            for i, doc in enumerate(self._source_docs(source)):
                documents += 1
                if is_val_file:
                    held_out = True
                else:
                    held_out = not self.val_files and self._held_out(position)
                    position += 1
                if self.dedupe:
                    key = dedupe_key(doc)
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                (val if held_out else train).append(i)
                sizes["val" if held_out else "train"] += len(doc.encode("utf-8"))
            # seeded by the source's name: adding a source leaves the others' samples
            seed = zlib.crc32(f"{self.split_seed}:{source.label}".encode())
            plans.append(
                SourcePlan(
                    source,
                    weighted(train, source.weight, seed),
                    val,
                    documents,
                    duplicates,
                    round(sizes["train"] * source.weight),
                    sizes["val"],
                )
            )
        self._plans = plans
        self._plan_skips = copy.deepcopy(self.skips)
        for plan in plans:
            log.info(
                "pretrain data: %s: %d documents, %d exact duplicates dropped, %d train (weight %g), %d val",
                plan.label,
                plan.documents,
                plan.duplicates,
                len(plan.train),
                plan.source.weight,
                len(plan.val),
            )
        return plans

    def _held_out(self, position: int) -> bool:
        """The seeded hash that holds out about ``val_fraction`` of the documents (by their position)."""
        return zlib.crc32(f"{self.split_seed}:{position}".encode()) % 10_000 < self.val_fraction * 10_000

    def _restore_skips(self) -> None:
        """Report the planning pass's count of bad records: later reads meet the same records again."""
        self.skips = copy.deepcopy(self._plan_skips)

    def _emit(self, plan: SourcePlan, with_val: bool) -> Iterator[tuple[str, str]]:
        """(split, text) of one source's planned documents: the training copies and, ``with_val``, the held-out ones.

        Each ascending run of ``plan.train`` (a whole copy, or the sample of the fraction) is one read of the file.
        """
        runs = ascending_runs(plan.train) or [[]]
        for r, run in enumerate(runs):
            wanted = dict.fromkeys(run, "train")
            if r == 0 and with_val:
                wanted.update(dict.fromkeys(plan.val, "val"))
            if not wanted:
                continue
            last = max(wanted)
            for position, doc in enumerate(self._source_docs(plan.source)):
                if position in wanted:
                    yield wanted[position], doc
                if position == last:
                    break

    def _split_docs(self) -> Iterator[tuple[str, str, str]]:
        """(split, source name, text) for every planned document, source after source."""
        for plan in self._plan():
            label = plan.label  # once per source: a Path parse per document took a third of the reading time
            for split, doc in self._emit(plan, with_val=True):
                yield split, label, doc

    def iter_texts(self) -> Iterator[str]:
        """The training documents as the shards hold them (converted, deduplicated, weighted), sources interleaved.

        bpe.max_bytes keeps an even sample of this stream and stops once it has enough, so every stretch of it must
        already be the mixture: the next document comes from the source furthest behind on its share of the bytes.
        """
        plans = [plan for plan in self._plan() if plan.train]
        streams = [self._emit(plan, with_val=False) for plan in plans]
        behind = [(0.0, k) for k in range(len(plans))]  # (share of source k's bytes given out, k)
        try:
            while behind:
                share, k = heapq.heappop(behind)
                _, doc = next(streams[k], (None, None))
                if doc is None:
                    continue
                yield doc
                heapq.heappush(behind, (share + len(doc.encode("utf-8")) / max(plans[k].train_bytes, 1), k))
        finally:  # also when the tokenizer trainer stops early (max_bytes)
            self._restore_skips()

    def _settings(self) -> dict:
        """Everything besides the input files that the token bytes depend on (the OpenCC version converts)."""
        return {
            "tokenizer_sha256": hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
            "vocab_size": len(self.tokenizer),
            "eos_id": self.tokenizer.eos_token_id,
            "format": self.format,
            "text_field": self.text_field,
            "val_fraction": self.val_fraction,
            "seed": self.split_seed,  # the key keeps the name it had as the run's seed, so those caches stay valid
            "on_error": self.on_error,
            "shard_mb": self.shard_mb,
            "chunk_chars": self.chunk_chars,
            "mixture": [
                {"name": s.label, "weight": s.weight, "format": s.format, "fill": dict(s.fill)} for s in self.sources
            ],
            "dedupe": self.dedupe,
            "convert": self.convert and f"{self.convert} (opencc {importlib.metadata.version('opencc')})",
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
        """Tokenize every planned document once into shards; meta.json, written last, marks them complete.

        A rerun after a crash keeps the finished shards and tokenizes only the missing ones.
        """
        target = self.token_dir
        if (target / "meta.json").exists():
            meta = json.loads((target / "meta.json").read_text())
            self.skips = SkipCounter(
                Counter(meta["skipped"]), list(meta["skip_examples"]), Counter(meta.get("ignored_fields", {}))
            )
            log.info("pretrain data: reusing token shards in %s", target)
            return
        if self.tokenizer.eos_token_id is None:
            raise ValueError("pretraining separates documents with EOS; the tokenizer has no eos token")
        settings = self._settings()
        encode = make_encoder(self.tokenizer.backend_tokenizer, self.tokenize_engine)  # a refusal before any reading
        plans = self._plan()
        writer = ShardWriter(
            target,
            encode,
            settings["eos_id"],
            token_dtype(settings["vocab_size"]),
            self.num_proc,
            self.chunk_chars,
        )
        shards = writer.write(
            plan_shards(self._split_docs(), int(self.shard_mb * 1e6)),
            total_bytes=sum(plan.train_bytes + plan.val_bytes for plan in plans),
        )
        self._restore_skips()

        def total(key: str, rows: list[dict]) -> dict[str, int]:
            return {split: sum(s[key] for s in rows if s["split"] == split) for split in SHARD_SPLITS}

        by_source: dict[str, dict] = {}
        for plan in plans:
            entry = by_source.setdefault(
                plan.label, {"weight": plan.source.weight, "documents_read": 0, "duplicates": 0}
            )
            entry["documents_read"] += plan.documents
            entry["duplicates"] += plan.duplicates
        for label, entry in by_source.items():
            rows = [s for s in shards if s["source"] == label]
            entry.update(documents=total("documents", rows), tokens=total("tokens", rows))
        meta = {
            **settings,
            "dtype": writer.dtype.name,
            "tokens": total("tokens", shards),
            "documents": total("documents", shards),
            "duplicates": sum(plan.duplicates for plan in plans),
            "by_source": by_source,
            "shards": shards,
            "sources": {
                split: [{"path": p, "bytes": os.path.getsize(p)} for p in files]
                for split, files in (("train", self.train_files), ("val", self.val_files))
            },
            "skipped": dict(sorted(self.skips.skipped.items())),
            "skip_examples": self.skips.first_errors,
            "ignored_fields": dict(sorted(self.skips.ignored_fields.items())),
        }
        write_atomically(
            target / "meta.json", lambda f: f.write((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        )
        log.info(
            "pretrain data: %s tokens, %s documents in %d shards; %d exact duplicates dropped",
            meta["tokens"],
            meta["documents"],
            len(shards),
            meta["duplicates"],
        )
        if len(plans) > 1:
            for label, counts in by_source.items():
                log.info("pretrain data: %s: %s tokens (weight %g)", label, counts["tokens"], counts["weight"])
        self.log_skips()

    def _require_windows(self, meta: dict) -> None:
        """Each split must fill one window of seq_len+1 tokens: say so naming the input files and the setting to
        change, rather than let the token shards (a cache folder the user never named) fail to make windows."""
        for split in SHARD_SPLITS:
            tokens, documents = meta["tokens"][split], meta["documents"][split]
            if tokens >= self.seq_len + 1:
                continue
            if split == "val" and not self.val_files:
                files, fix = self.train_files, f"raise data.val_fraction (now {self.val_fraction}) or give val_files"
            else:
                files, fix = (self.val_files if split == "val" else self.train_files), "give more text"
            raise DataError(
                ", ".join(files),
                None,
                f"{documents} {split} documents of {tokens} tokens, fewer than one window of "
                f"seq_len+1={self.seq_len + 1}; {fix} or lower seq_len",
            )

    def _val_labels(self) -> list[str]:
        """The sources with a validation set of their own: the val files, or else every training source."""
        return list(dict.fromkeys(s.label for s in (self.val_sources or self.sources)))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        meta = json.loads((self.token_dir / "meta.json").read_text())
        self._require_windows(meta)
        dtype = np.dtype(meta["dtype"])

        def windows(rows: list[dict]) -> TokenWindows:
            return TokenWindows([self.token_dir / s["file"] for s in rows], dtype, self.seq_len)

        self.train_set, self.val_set = (
            windows([s for s in meta["shards"] if s["split"] == split]) for split in SHARD_SPLITS
        )
        if self.val_per_source:
            for label in self._val_labels():
                rows = [s for s in meta["shards"] if s["split"] == "val" and s["source"] == label]
                tokens = sum(s["tokens"] for s in rows)
                if tokens < self.seq_len + 1:
                    raise ValueError(
                        f"data.val_per_source: source {label!r} holds out {tokens} tokens, fewer than one "
                        f"window of seq_len+1={self.seq_len + 1}; raise data.val_fraction or set "
                        "data.val_per_source=false"
                    )
                self.val_sets[label] = windows(rows)
        if self.arch == "seq2seq":
            sentinels = sentinel_token_ids(self.tokenizer)

            def corrupted(windows: TokenWindows) -> SpanCorruption:
                return SpanCorruption(
                    windows, sentinels, self.tokenizer.eos_token_id, seed=self.seed, **self.span_corruption
                )

            self.train_set, self.val_set = corrupted(self.train_set), corrupted(self.val_set)
            self.val_sets = {label: corrupted(windows) for label, windows in self.val_sets.items()}

    def val_dataloader(self) -> StatefulDataLoader | dict[str, StatefulDataLoader]:
        """One loader over all validation windows; with ``val_per_source`` a dict of loaders by source name, which
        LMModule reports as val/loss/<name> and, over all of them together, val/loss."""
        if not self.val_per_source:
            return super().val_dataloader()
        return {label: self._loader(windows, shuffle=False) for label, windows in self.val_sets.items()}

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """Causal: the first tokens of validation windows. Seq2seq: corrupted windows and their span targets."""
        items = [self.val_set[i] for i in range(min(n, len(self.val_set)))]
        if self.arch == "seq2seq":  # the encoder input's final EOS is added again when the prompt is encoded
            return [
                (
                    self.tokenizer.decode(x["input_ids"][:-1]),
                    self.tokenizer.decode(x["labels"], skip_special_tokens=True),
                )
                for x in items
            ]
        return [(self.tokenizer.decode(x["input_ids"][: min(16, self.seq_len)]), None) for x in items]
