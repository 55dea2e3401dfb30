"""Tokenize a stream of documents into memmap shards, in parallel, resumably and reproducibly.

The reading process cuts the (split, source, text) stream into shards of about ``shard_mb`` of
UTF-8 text, in document order, per split (``train-00000.bin``, ``val-00000.bin``, ...), and also
where the source changes, so every shard holds one source of a mixture and its tokens count for
that source (meta.json's per-source counts, the per-source validation sets). The cut depends only
on the documents and ``shard_mb``, never on the number of processes, so the same input and
tokenizer always give the same files. Each shard is one task: a worker tokenizes it and writes
``.<name>.tmp<pid>`` beside it, then renames it (lmlab.core.files.write_atomically); a shard is done when its
file exists, so a rerun after a crash skips the finished shards and redoes only the rest.

A shard file is the documents' token ids, each document followed by EOS, as uint16 when the
vocabulary has fewer than 65536 entries, else uint32. A document longer than
``chunk_chars`` characters is tokenized in pieces of that many characters (memory stays
bounded on a 50 MB line); its pieces' tokens are concatenated with no EOS between them, so
a token may split where a piece ends (byte-level tokenizers still decode the exact text).

Workers are 'spawn' processes that each hold their own copy of the encoder and run it
single-threaded (TOKENIZERS_PARALLELISM=false), so ``num_proc`` is the number of cores used. They are started
without the parent's main script (:func:`_main_left_out`): a worker needs nothing from it, and train.py's or
prepare.py's imports (torch, Lightning, transformers) took each worker about 10 s of CPU on a 2-core box.
``num_proc=0`` tokenizes in the calling process: with tokenizers, on its own threads; with tiktoken, on one.

The engine (``tokenize_engine``): ``tiktoken`` runs a byte-level BPE's own regex and merges through tiktoken, several
times faster per core and with the same ids by construction (lmlab.core.tiktoken_twin, which refuses a tokenizer it
cannot twin exactly); ``tokenizers`` is Hugging Face's; ``auto`` takes tiktoken where it can, else tokenizers. The
files are the same bytes either way, so the engine is not part of the cache's key.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lmlab.core.files import write_atomically
from lmlab.core.tiktoken_twin import NoTwin, TiktokenTwin

SHARD_SPLITS = ("train", "val")
ENGINES = ("auto", "tiktoken", "tokenizers")
Encode = Callable[[list[str]], Sequence[Sequence[int]]]  # texts -> their ids (add_special_tokens=False)

log = logging.getLogger(__name__)


def _tokenizers_encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def make_encoder(tokenizer: Tokenizer, engine: str) -> Encode:
    """``tokenizer``'s batch encoding by ``tokenize_engine`` (module docstring): auto is tiktoken where it gives
    exactly the tokenizer's ids, else tokenizers (the log says why); an explicit tiktoken that cannot is an error
    naming the reason. The encoder pickles, so worker processes take it as it is."""
    if engine not in ENGINES:
        raise ValueError(f"tokenize_engine={engine!r}: one of {', '.join(ENGINES)}")
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # whole documents, whatever transformers left switched on
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if engine != "tokenizers":
        try:
            twin = TiktokenTwin(tokenizer)
        except NoTwin as e:
            if engine == "tiktoken":
                raise ValueError(f"tokenize_engine=tiktoken: no exact tiktoken twin of this tokenizer: {e}") from e
            log.info("tokenize engine: tokenizers (tiktoken would not give the same ids: %s)", e)
        else:
            log.info("tokenize engine: tiktoken (the tokenizer's regex and merges; the same ids)")
            return twin.encode_batch
    return partial(_tokenizers_encode, tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


@dataclass
class Shard:
    """Consecutive documents of one split and one source: the unit of work and of resume."""

    split: str
    index: int
    source: str
    docs: list[str] = field(default_factory=list)
    nbytes: int = 0  # UTF-8 bytes of text, for the progress bar and the size cut

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.bin"


def plan_shards(docs: Iterable[tuple[str, str, str]], shard_bytes: int) -> Iterator[Shard]:
    """Group (split, source, text) documents, in order, into shards of at least ``shard_bytes`` of one source each
    (smaller where a source ends, and the last ones)."""
    open_shards: dict[str, Shard] = {}
    next_index = dict.fromkeys(SHARD_SPLITS, 0)
    for split, source, doc in docs:
        shard = open_shards.get(split)
        if shard is not None and shard.source != source:
            yield shard
            shard = None
        if shard is None:
            shard = open_shards[split] = Shard(split, next_index[split], source)
            next_index[split] += 1
        shard.docs.append(doc)
        shard.nbytes += len(doc.encode("utf-8"))
        if shard.nbytes >= shard_bytes:
            yield open_shards.pop(split)
    yield from open_shards.values()


def _pieces(docs: list[str], chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """(piece, is the document's last piece) with every piece at most ``chunk_chars`` long."""
    for doc in docs:
        starts = range(0, len(doc), chunk_chars)
        for start in starts:
            yield doc[start : start + chunk_chars], start == starts[-1]


def _batches(pieces: Iterator[tuple[str, bool]], chunk_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces, about ``chunk_chars`` characters per batch, so one encode call's memory stays bounded."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_shard(encode: Encode, docs: list[str], path: Path, eos_id: int, dtype: np.dtype, chunk_chars: int) -> int:
    """Write the documents' tokens (EOS after each) to ``path`` atomically; return the token count."""
    eos = np.array([eos_id], dtype=np.int64)

    def write(f) -> int:
        tokens = 0
        for batch in _batches(_pieces(docs, chunk_chars), chunk_chars):
            ids: list = []  # each piece's ids (a list or an array), EOS after a document's last
            for piece_ids, (_, last) in zip(encode([p for p, _ in batch]), batch, strict=True):
                ids.append(piece_ids)
                if last:
                    ids.append(eos)
            out = np.concatenate(ids, dtype=np.int64)
            if out.size and out.max() > np.iinfo(dtype).max:
                raise OverflowError(f"token id {out.max()} does not fit the shards' {dtype}")
            out.astype(dtype).tofile(f)
            tokens += len(out)
        return tokens

    return write_atomically(path, write)


_MAIN_SWAP = threading.Lock()  # two writers in two threads must not restore each other's stand-in


@contextlib.contextmanager
def _main_left_out() -> Iterator[None]:
    """Within the block, a process that multiprocessing spawns does not run the parent's main script first.

    A spawned child imports the parent's ``__main__`` from its file (or as a module, under ``python -m``) before it
    unpickles its task, so that functions defined there can be found; a ``__main__`` with neither a file nor a spec,
    as in an interactive session, it leaves out. The workers run only :func:`_encode_in_worker` and an encoder from
    :func:`make_encoder`, which live in modules of their own, so for the block ``__main__`` is a module with neither:
    nothing pickled during it refers to ``__main__``. An encoder defined in a main script would fail to pickle here
    (make_encoder's never are).
    """
    with _MAIN_SWAP:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


_worker_encode: Encode | None = None


def _init_worker(encode: Encode) -> None:
    """The encoder, single-threaded, in each worker process, so num_proc processes use num_proc cores."""
    global _worker_encode
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encode = encode


def _encode_in_worker(docs: list[str], path: Path, eos_id: int, dtype: np.dtype, chunk_chars: int) -> int:
    return encode_shard(_worker_encode, docs, path, eos_id, dtype, chunk_chars)


@dataclass
class ShardWriter:
    """Tokenizes planned shards into ``out_dir``, skipping the ones already there, with a progress bar."""

    out_dir: Path
    encode: Encode  # make_encoder's (it pickles to the workers: a function of an importable module)
    eos_id: int
    dtype: np.dtype
    num_proc: int
    chunk_chars: int

    def write(self, shards: Iterable[Shard], total_bytes: int) -> list[dict]:
        """One row (file, split, source, tokens, documents) per shard, in order; tokenizes only the missing shards.

        At most two shards per process are in flight, so memory stays bounded however large the corpus.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        pending: deque[tuple[Shard, Future | int, bool]] = deque()  # shard, its tokens (or their future), done before
        with (
            self._pool() as pool,
            tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenize", mininterval=1.0
            ) as bar,
        ):
            for shard in shards:
                path = self.out_dir / shard.name
                if path.exists():
                    pending.append((shard, path.stat().st_size // self.dtype.itemsize, True))
                else:
                    pending.append((shard, self._submit(pool, shard.docs, path), False))
                self._collect(pending, rows, bar, keep=2 * max(self.num_proc, 1))
            self._collect(pending, rows, bar, keep=0)
            bar.total = bar.n  # the total was the input files' size: text plus newlines and record syntax
        return rows

    def _pool(self) -> ProcessPoolExecutor | contextlib.nullcontext:
        if self.num_proc == 0:
            return contextlib.nullcontext()
        return ProcessPoolExecutor(
            self.num_proc,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.encode,),
        )

    def _submit(self, pool: ProcessPoolExecutor | None, docs: list[str], path: Path) -> Future | int:
        """Tokenize in a worker (a future) or, without a pool, here and now (the token count)."""
        if pool is None:
            return encode_shard(self.encode, docs, path, self.eos_id, self.dtype, self.chunk_chars)
        with _main_left_out():  # the pool starts its workers in submit, as they are needed
            return pool.submit(_encode_in_worker, docs, path, self.eos_id, self.dtype, self.chunk_chars)

    @staticmethod
    def _collect(pending: deque, rows: list[dict], bar: tqdm, keep: int) -> None:
        """Move finished shards, in order, from ``pending`` to ``rows``, waiting while more than ``keep`` are in flight.

        The progress bar counts this run's work only (shards done before leave its total), so MB/s and ETA stay honest.
        """
        while pending and (len(pending) > keep or not isinstance(pending[0][1], Future)):
            shard, tokens, done_before = pending.popleft()
            rows.append(
                {
                    "file": shard.name,
                    "split": shard.split,
                    "source": shard.source,
                    "documents": len(shard.docs),
                    "tokens": tokens.result() if isinstance(tokens, Future) else tokens,
                }
            )
            if done_before:
                bar.total -= shard.nbytes
                bar.refresh()
            else:
                bar.update(shard.nbytes)
            bar.set_postfix(tokens=f"{sum(r['tokens'] for r in rows):,}", refresh=False)
