"""What every language-model datamodule shares: the tokenizer slot, loaders, and the skip report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.formats import DataError, SkipCounter, read_records
from datamodules.sources import Source, fill_placeholders, parse_sources
from lmlab.core.collate import CausalCollator, Seq2SeqCollator

log = logging.getLogger(__name__)


class LMDataModule(L.LightningDataModule):
    """Base for the pretraining and SFT datamodules.

    ``arch`` (the model preset's) chooses the sample layout: ``causal`` samples are one
    sequence with aligned labels; ``seq2seq`` samples are the encoder's ``input_ids`` and the
    decoder's ``labels``.

    The tokenizer arrives after construction, through :meth:`connect`, because without a given
    one it is trained on this datamodule's own text (:meth:`iter_texts`). Loaders are
    torchdata's ``StatefulDataLoader`` so Lightning stores the position inside the epoch in
    every checkpoint and a resumed run sees exactly the batches it had not seen yet.
    """

    def __init__(
        self,
        train_files: Sequence[str | dict],
        val_files: Sequence[str] | None,
        val_fraction: float,
        format: str,
        batch_size: int,
        num_workers: int,
        pad_to_multiple_of: int,
        seed: int,
        on_error: str,
        arch: str,
    ):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        if arch not in ("causal", "seq2seq"):
            raise ValueError(f"data.arch must be 'causal' or 'seq2seq', got {arch!r}")
        self.arch = arch
        self.sources = parse_sources(train_files)  # weights, names and per-file formats (datamodules/sources.py)
        self.train_files = [source.path for source in self.sources]
        self.val_files = list(val_files or [])
        self.val_fraction = val_fraction
        self.format = format
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed
        self.on_error = on_error
        self.skips = SkipCounter()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def records(
        self, files: Sequence[str | Source], adapter: Callable[[Any, str, int], Any]
    ) -> Iterator[tuple[str, int, Any]]:
        """(source, line, adapted record) for every record of ``files`` (paths, or Sources with their own format
        and placeholder fill).

        A record that cannot be read or adapted raises its DataError, or under on_error=skip
        is counted in ``self.skips`` and passed over.
        """
        skips = self.skips if self.on_error == "skip" else None
        for entry in files:
            spec = entry if isinstance(entry, Source) else Source(entry)
            for source, line, record in read_records(spec.path, spec.format or self.format, skips=skips):
                try:
                    yield source, line, adapter(fill_placeholders(record, spec.fill), source, line)
                except DataError as e:
                    if skips is None:
                        raise
                    skips.add("bad records", e)

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Hand over the run's tokenizer, configured by the caller (lmlab.core.tokenizer.configure_tokenizer: chat
        template, length); the datamodule reads it and never changes it (after litgpt's ``DataModule.connect``)."""
        self.tokenizer = tokenizer

    def iter_texts(self) -> Iterator[str]:
        """Training text, for training a tokenizer when none is given."""
        raise NotImplementedError

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """(prompt, reference answer or None) from the validation data, for the generations at validation."""
        raise NotImplementedError

    def collator(self) -> Callable[[list], dict]:
        """The loaders' collate_fn: the arch's collator (a subclass may wrap it)."""
        return (Seq2SeqCollator if self.arch == "seq2seq" else CausalCollator)(
            self.tokenizer.pad_token_id, self.pad_to_multiple_of
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> StatefulDataLoader:
        import torch

        assert self.tokenizer is not None, "datamodule.connect(tokenizer) before building loaders"
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collator(),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)

    def log_skips(self) -> None:
        log.info("data: %s", self.skips.report())
