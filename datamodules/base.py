"""What every language-model datamodule shares: the tokenizer slot, loaders, and the skip report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import (
    RandomSampler,
    StatefulDistributedSampler,
    _StatefulRandomSamplerIterator,
)
from transformers import PreTrainedTokenizerBase

from datamodules.formats import DataError, SkipCounter
from datamodules.sources import Source, adapted_records, parse_sources
from lmlab.core.collate import CausalCollator, PackedCausalCollator, Seq2SeqCollator

log = logging.getLogger(__name__)


class _EpochIterator(_StatefulRandomSamplerIterator):
    """torchdata's RandomSampler iterator, whose epoch order is drawn at its first index, from ``seed + epoch``."""

    def __init__(self, sampler: EpochRandomSampler):
        super().__init__(sampler)
        self.perm = None  # drawn at the first index: Lightning sets the epoch after making an epoch's iterator

    def __next__(self) -> int:
        if self.perm is None:
            self.sampler.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
            self.generator_state = self.sampler.generator.get_state()
            self.perm = self._get_perm()
        return super().__next__()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.sampler.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved position in the saved order; saved before an epoch's first index or after its last, that
        (next) epoch's own order, drawn at its first index. The epoch comes from the state too: loader processes draw
        indices as soon as the iterator is made, before Lightning sets the epoch."""
        super().load_state_dict(state_dict)
        if self.yielded in (0, self.num_samples):
            self.sampler.epoch = state_dict["epoch"] + (self.yielded == self.num_samples)
            self.perm, self.perm_index, self.yielded = None, 0, 0


class EpochRandomSampler(RandomSampler):
    """torchdata's RandomSampler (its iterator's state holds the position in the epoch) drawing epoch ``e``'s order from
    ``seed + e`` (``set_epoch``, which Lightning calls at each epoch's start), as DistributedSampler does. Its own drew
    each epoch from where the last one left its generator: a resume that restores no loader state (Lightning restores
    none from a checkpoint at an epoch's last batch in a max_epochs run) drew epoch 0's order again."""

    def __init__(self, data_source: Dataset, seed: int):
        import torch

        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> _EpochIterator:
        return _EpochIterator(self)


class ResumableDistributedSampler(StatefulDistributedSampler):
    """torchdata's StatefulDistributedSampler whose state also holds its epoch, restored at an epoch's end as the next
    epoch's start. Its own holds the position alone, and on resume Lightning makes the restored iterator before it
    sets the epoch: loader processes draw their indices at once, so the rest of a resumed epoch came in epoch 0's
    order; and one restored at an epoch's end counted an empty epoch, shifting every later epoch's order."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.epoch = state_dict.get("epoch", self.epoch)
        if self.next_yielded >= self.num_samples:
            self.epoch, self.next_yielded = self.epoch + 1, None


class LMDataModule(L.LightningDataModule):
    """Base for the pretraining, SFT, preference and classification datamodules.

    The constructor takes the data's own fields (files, formats, splits: a preset's, conf/data/schema/). What the run
    decides arrives later, through :meth:`connect` (after litgpt's ``DataModule.connect``): the tokenizer, the
    model's ``arch``, the max length, the batch size, the batch-order seed and the loader settings. The tokenizer
    cannot come earlier, because without a given one it is trained on this datamodule's own text
    (:meth:`iter_texts`); so what that text depends on (the held-out split, the mixture's samples) is a data field,
    ``split_seed``, not the run's seed. Loaders are torchdata's ``StatefulDataLoader`` so Lightning stores the
    position inside the epoch in every checkpoint and a resumed run sees exactly the batches it had not seen yet.
    """

    packable = False  # whether ``packing`` applies: samples a row can hold several of (SFT, DPO, classification)

    def __init__(
        self,
        train_files: Sequence[str | dict],
        val_files: Sequence[str] | None,
        val_fraction: float,
        format: str,
        on_error: str,
        split_seed: int,
    ):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.sources = parse_sources(train_files)  # weights, names and per-file formats (datamodules/sources.py)
        self.train_files = [source.path for source in self.sources]
        self.val_files = list(val_files or [])
        self.val_fraction = val_fraction
        self.format = format
        self.on_error = on_error
        self.split_seed = split_seed
        self.skips = SkipCounter()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def records(
        self, files: Sequence[str | Source], adapter: Callable[[Any, str, int], Any]
    ) -> Iterator[tuple[str, int, Any]]:
        """(source, line, adapted record) for every record of ``files`` (paths, or Sources with their own format
        and placeholder fill), read by :func:`datamodules.sources.adapted_records`.

        A record that cannot be read or adapted raises its DataError, or under on_error=skip
        is counted in ``self.skips`` and passed over; fields the adapter never reads are counted there too. A file
        that holds no record at all is an error naming it: a source that adds nothing (an empty file, a CSV with a
        header only) is a mistake, never a silent no-op. (Under on_error=skip a file whose every record was bad
        adds nothing too, but its records are counted.)
        """
        skips = self.skips if self.on_error == "skip" else None
        for entry in files:
            found, skipped_before = 0, self.skips.total
            for source, line, record in adapted_records(
                [entry], self.format, adapter, skips, self.skips.ignored_fields
            ):
                if isinstance(record, DataError):
                    if skips is None:
                        raise record
                    skips.add("bad records", record)
                    continue
                found += 1
                yield source, line, record
            if not found and self.skips.total == skipped_before:
                raise DataError(str(entry.path if isinstance(entry, Source) else entry), None, "no records (empty?)")

    def connect(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        arch: str,
        max_length: int,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        pin_memory: bool = False,
        packing: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """Hand over the run's tokenizer and what the run decides (train.py's ``connect_data``; litgpt's
        ``DataModule.connect(tokenizer, batch_size, max_seq_length)`` is the model). The tokenizer comes configured
        (lmlab.core.tokenizer.configure_tokenizer: chat template, length); the datamodule reads it, never changes it.

        - ``arch``: the model preset's; ``causal`` samples are one sequence with aligned labels, ``seq2seq``
          samples the encoder's ``input_ids`` and the decoder's ``labels``;
        - ``max_length``: tokens per sample (the run's ``seq_len``): a text window, a chat's cut, a
          classified text's cut;
        - ``batch_size`` and ``seed``: samples per batch and the order they are drawn in;
        - ``num_workers`` (loader processes), ``pad_to_multiple_of`` (batch widths) and ``pin_memory`` (page-locked
          batches for non-blocking copies to a GPU), defaults for the CPU;
        - ``packing``: a batch's samples end to end in one row, without padding (lmlab.core.collate's
          PackedCausalCollator), for a datamodule whose class says it can (``packable``: SFT, DPO, classification)
          and a causal model;
        - ``chat_template``: the run's chat template (None: the tokenizer's), which chat data renders with
          unless its preset has its own (:meth:`datamodules.sft.SFTDataModule.connect`); other data renders none.
        """
        if arch not in ("causal", "seq2seq"):
            raise ValueError(f"model.arch must be 'causal' or 'seq2seq', got {arch!r}")
        if packing and not (self.packable and arch == "causal"):
            raise ValueError(
                f"packing=true packs SFT, DPO and classification samples for a causal model; "
                f"{type(self).__name__} with model.arch={arch} pads its batches: set packing=false"
            )
        self.tokenizer = tokenizer
        self.arch = arch
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pin_memory = pin_memory
        self.packing = packing

    def iter_texts(self) -> Iterator[str]:
        """Training text, for training a tokenizer when none is given."""
        raise NotImplementedError

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """(prompt, reference answer or None) from the validation data, for the generations at validation."""
        raise NotImplementedError

    def sample_images(self, n: int) -> Any:
        """The images of :meth:`sample_pairs`' prompts (pixel_values) for a vision-language model; None: text only."""
        return None

    def collator(self) -> Callable[[list], dict]:
        """The loaders' collate_fn: the arch's collator, or the packing one (a subclass may wrap it)."""
        if self.packing:
            return PackedCausalCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        return (Seq2SeqCollator if self.arch == "seq2seq" else CausalCollator)(
            self.tokenizer.pad_token_id, self.pad_to_multiple_of
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> StatefulDataLoader:
        """A loader over ``dataset``; a shuffled one in an order drawn from ``seed`` that a resumed run repeats exactly.

        The shuffling sampler (:class:`EpochRandomSampler`, after torchdata's RandomSampler, what ``shuffle=True``
        builds) gets a generator of its own.
        Given only the loader's, the two share it: the loader draws a base seed for worker processes from it at
        each epoch's start, after the sampler's permutation, and the sampler's checkpointed state is the generator
        from before that permutation. A restore draws the permutation again but not the base seed, so without
        loader processes every epoch after the resumed one had another order than the uninterrupted run's (issue
        16). The loader keeps a seeded generator for the base seeds, which would otherwise be drawn from (and move)
        torch's global one. Under DDP see :meth:`_sampler`.
        """
        import torch

        assert self.tokenizer is not None, "datamodule.connect(tokenizer, ...) before building loaders"
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, shuffle),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collator(),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def _sampler(self, dataset: Dataset, shuffle: bool) -> Sampler | None:
        """Under DDP (a trainer of more than one rank) this rank's share (:class:`ResumableDistributedSampler`), whose
        position the loader's checkpointed state holds; Lightning leaves a DistributedSampler as it is and sets its
        epoch. Lightning's own would wrap the sampler in a DistributedSamplerWrapper, which keeps no state: a resumed
        DDP run drew other batches than the uninterrupted one. Else :class:`EpochRandomSampler`, or None (in
        order)."""

        trainer = self.trainer  # Lightning's, once the datamodule is attached to one
        if trainer is not None and trainer.world_size > 1:
            return ResumableDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=shuffle, seed=self.seed
            )
        return EpochRandomSampler(dataset, self.seed) if shuffle else None

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)

    def log_skips(self) -> None:
        log.info("data: %s", self.skips.report())
