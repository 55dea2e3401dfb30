"""Text classification data: (text, label) records -> token ids and a class id, split and balanced with a seed.

Labels are names listed in the preset (``labels: [ham, spam]``); a label's id is its position
there, and the same list becomes the exported model's ``id2label``. A record whose label is not
in the list is an error naming its file and line (or a counted skip under ``on_error=skip``).
When a file has no split of its own, a seeded shuffle cuts each class 70/10/20 on its own, so val
and test keep the data's natural class mix: that is the mix a deployed classifier meets, and
its false-positive rate is only measurable there. Balancing touches the training split alone:
``undersample`` cuts every class to the smallest one's count (as GPT2-SFT did, but GPT2-SFT
balanced before the split, so its test set was balanced too), ``class_weights`` keeps the data
whole and hands the loss inverse-frequency weights. Both use ``split_seed``, not the run's
seed, so a sweep over seeds keeps one test set, and every ``balance`` choice sees the same
val and test messages.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.base import LMDataModule
from datamodules.formats import DataError, _field
from datamodules.sft import ListDataset
from lmlab.core.collate import PAD_SIDES, pack, pad, padding_mask, round_up

log = logging.getLogger(__name__)
BALANCE = ("none", "undersample", "class_weights")
CLASSIFY_SPLITS = ("train", "val", "test")
Example = tuple[str, int, str, int]  # (source, line, text, label id)


def to_labelled(
    record: Any, source: str, line: int, text_field: str, label_field: str, labels: Sequence[str]
) -> tuple[str, int]:
    """(text, label id); the label is one of ``labels`` by name, or an integer id into it."""
    text = _field(record, text_field, source, line)
    value = record.get(label_field)
    if isinstance(value, str) and value.strip() in labels:
        return text, labels.index(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return text, value
    raise DataError(source, line, f"unknown label {value!r}; data.labels is {list(labels)}", field=label_field)


def undersample(examples: list[Example], num_classes: int, seed: int) -> list[Example]:
    """Every class cut to the smallest class's count (a seeded choice), in the original order."""
    by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i, example in enumerate(examples):
        by_class[example[3]].append(i)
    present = [ids for ids in by_class.values() if ids]
    n = min(len(ids) for ids in present)
    rng = random.Random(seed)
    keep = {i for ids in present for i in rng.sample(ids, n)}
    return [e for i, e in enumerate(examples) if i in keep]


def split_examples(examples: list[Example], fractions: dict[str, float], seed: int) -> dict[str, list[Example]]:
    """Stratified: each class is shuffled (seeded) and cut on its own, ``round(n_class * fraction)`` examples
    per named part, the rest to train; so every part keeps the class proportions. In the original order."""
    by_class: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        by_class.setdefault(example[3], []).append(i)
    rng = random.Random(seed)
    parts: dict[str, list[int]] = {name: [] for name in [*fractions, "train"]}
    for label in sorted(by_class):
        ids = by_class[label]
        rng.shuffle(ids)
        start = 0
        for name, fraction in fractions.items():
            n = round(len(ids) * fraction)
            parts[name] += ids[start : start + n]
            start += n
        parts["train"] += ids[start:]
    return {name: [examples[i] for i in sorted(ids)] for name, ids in parts.items()}


class ClassificationCollator:
    """Pads ``input_ids`` (on ``padding_side``) with the pad id; ``labels`` is one class id per row."""

    def __init__(self, pad_id: int, padding_side: str, pad_to_multiple_of: int = 1):
        if padding_side not in PAD_SIDES:
            raise ValueError(f"data.padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_id = pad_id
        self.side = padding_side
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [s["input_ids"] for s in samples]
        width = round_up(max(len(r) for r in ids), self.multiple)
        return {
            "input_ids": pad(ids, self.pad_id, width, self.side),
            "attention_mask": padding_mask(ids, width, self.side),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        }


class PackedClassificationCollator:
    """Padding-free classification batches (``packing=true``): the texts end to end in one row, with
    lmlab.core.collate.pack's ``position_ids`` (restarting with every text, so each attends to itself only) and
    ``document_lengths``; ``labels`` one class id per text; ``pool_positions`` the row position each text is
    classified at. That is the position transformers' sequence classifiers pool at in a padded batch (and at
    inference): the text's last token whose id is not the pad id (its first token if it has none), so a text that
    ends in a pad id (an EOS that doubles as padding) is classified at the token before, as there."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor | list[int]]:
        rows = [torch.as_tensor(s["input_ids"]) for s in samples]
        batch = pack(rows, self.pad_id, self.multiple)
        starts = [0, *itertools.accumulate(len(row) for row in rows)][:-1]
        return {
            **batch,
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "pool_positions": torch.tensor(
                [start + self._pooled(row) for start, row in zip(starts, rows, strict=True)]
            ),
        }

    def _pooled(self, row: torch.Tensor) -> int:
        """The position in ``row`` transformers pools at: its last non-pad token, else its first."""
        non_pad = (row != self.pad_id).nonzero()
        return int(non_pad[-1]) if len(non_pad) else 0


class ClassificationDataModule(LMDataModule):
    """(text, label) records from jsonl/json/parquet/csv/tsv files, tokenized in memory, with a test split."""

    packable = True

    def __init__(
        self,
        train_files: Sequence[str],
        labels: Sequence[str],
        val_files: Sequence[str] | None = None,
        test_files: Sequence[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        format: Any = "auto",
        text_field: str = "text",
        label_field: str = "label",
        balance: str = "undersample",
        padding_side: str = "right",
        split_seed: int = 123,
        on_error: str = "raise",
    ):
        super().__init__(train_files, val_files, val_fraction, format, on_error, split_seed)
        if balance not in BALANCE:
            raise ValueError(f"data.balance must be one of {BALANCE}, got {balance!r}")
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise ValueError(f"data.labels must name at least two distinct classes, got {list(labels)}")
        self.labels = [str(label) for label in labels]
        self.test_files = list(test_files or [])
        self.test_fraction = test_fraction
        self.text_field = text_field
        self.label_field = label_field
        self.balance = balance
        self.padding_side = padding_side
        self.test_set: ListDataset | None = None
        self._splits: dict[str, list[Example]] | None = None

    def connect(self, tokenizer: PreTrainedTokenizerBase, *, arch: str, **run) -> None:
        """:meth:`LMDataModule.connect`; texts are cut to the run's max length, for a causal model only."""
        if arch != "causal":
            raise ValueError(
                "stage=classify pools a causal model's last token: choose a causal model preset "
                "(llama, gpt2, ...), not an encoder-decoder"
            )
        super().connect(tokenizer, arch=arch, **run)

    def _read(self, files: Sequence[str]) -> list[Example]:
        def adapter(record: Any, source: str, line: int) -> tuple[str, int]:
            return to_labelled(record, source, line, self.text_field, self.label_field, self.labels)

        return [(source, line, *example) for source, line, example in self.records(files, adapter)]

    def splits(self) -> dict[str, list[Example]]:
        """train/val/test examples: given files where there are any, else stratified seeded cuts of the training
        files; under balance=undersample the training split alone is then undersampled."""
        if self._splits is None:
            fractions = {
                name: fraction
                for name, files, fraction in (
                    ("val", self.val_files, self.val_fraction),
                    ("test", self.test_files, self.test_fraction),
                )
                if not files
            }
            splits = split_examples(self._read(self.train_files), fractions, self.split_seed)
            splits.update(
                {
                    name: self._read(files)
                    for name, files in (("val", self.val_files), ("test", self.test_files))
                    if files
                }
            )
            if self.balance == "undersample":
                splits["train"] = undersample(splits["train"], len(self.labels), self.split_seed)
            for name in CLASSIFY_SPLITS:
                if not splits[name]:
                    raise DataError(", ".join(self.train_files), None, f"no usable records for the {name} split")
            self._require_classes(splits)
            self._splits = {name: splits[name] for name in CLASSIFY_SPLITS}
        return self._splits

    def _require_classes(self, splits: dict[str, list[Example]]) -> None:
        """Training examples of at least two classes: with one, every prediction is that class and the test
        accuracy is a meaningless 1.0 (a filtered file, a label column misread). A class with no training
        examples at all is named in a warning, with how often val and test hold it: the model cannot predict it."""
        counts = {name: Counter(label for *_, label in splits[name]) for name in CLASSIFY_SPLITS}
        present = [label for c, label in enumerate(self.labels) if counts["train"][c]]
        if len(present) < 2:
            raise DataError(
                ", ".join(self.train_files),
                None,
                f"every training example has the label {present[0]!r} (data.labels is {self.labels}): a classifier "
                f"needs examples of at least two classes to learn anything",
                field=self.label_field,
            )
        for c, label in enumerate(self.labels):
            if not counts["train"][c]:
                log.warning(
                    "data: class %r has no training examples (val %d, test %d): the model cannot learn it",
                    label,
                    counts["val"][c],
                    counts["test"][c],
                )

    def class_counts(self, split: str = "train") -> list[int]:
        counts = Counter(label for *_, label in self.splits()[split])
        return [counts[c] for c in range(len(self.labels))]

    def class_weights(self) -> list[float] | None:
        """Inverse-frequency weights of the training split under balance=class_weights (else None)."""
        if self.balance != "class_weights":
            return None
        counts = self.class_counts("train")
        total = sum(counts)
        return [total / (len(counts) * n) if n else 0.0 for n in counts]

    def iter_texts(self) -> Iterator[str]:
        for _, _, text, _ in self.splits()["train"]:
            yield text

    def tokenize(self, text: str) -> list[int]:
        """The tokenizer's own encoding (its special tokens included), cut to max_length.

        The same call as ``tokenizer(text, truncation=True, max_length=...)`` outside lmlab, so the
        exported model sees exactly what it was trained on.
        """
        return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]

    def _dataset(self, examples: list[Example]) -> ListDataset:
        return ListDataset(
            [
                {"input_ids": torch.tensor(self.tokenize(text), dtype=torch.long), "label": label}
                for _, _, text, label in examples
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.splits()
        self.train_set, self.val_set, self.test_set = (self._dataset(splits[name]) for name in CLASSIFY_SPLITS)
        for name in CLASSIFY_SPLITS:
            counts = ", ".join(f"{label} {n}" for label, n in zip(self.labels, self.class_counts(name), strict=True))
            log.info("%s: %d examples (%s)", name, len(splits[name]), counts)
        self.log_skips()

    def collator(self) -> Callable[[list], dict]:
        if self.packing:
            return PackedClassificationCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        return ClassificationCollator(self.tokenizer.pad_token_id, self.padding_side, self.pad_to_multiple_of)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.test_set, shuffle=False)

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """None: a classifier generates no text, so the samples callback skips it."""
        return []

    def write_splits(self, out_dir: str | Path) -> dict[str, Path]:
        """The splits as jsonl files ({text, label}), e.g. to pretrain a backbone on the training texts only."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, examples in self.splits().items():
            paths[name] = out_dir / f"{name}.jsonl"
            with open(paths[name], "w", encoding="utf-8") as f:
                f.writelines(
                    json.dumps({"text": text, "label": self.labels[label]}, ensure_ascii=False) + "\n"
                    for _, _, text, label in examples
                )
        return paths
