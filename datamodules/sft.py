"""Supervised fine-tuning data: prompt/response and multi-turn chat, with -100 label masking.

Every template is a Jinja chat template (conf/template/), so Alpaca, ChatML-style and the
babyllama 资料/人类/助手 layouts are one mechanism, and the exported tokenizer formats
prompts the same way outside lmlab (``tokenizer.apply_chat_template``). A conversation is
cut into segments by rendering growing prefixes of it; the whole rendering is encoded once (the
ids inference sees) and only tokens that start in an assistant segment (content + EOS) are labels,
unless ``train_on_prompt`` is set. For an encoder-decoder the conversation up to its last reply
(with the reply's header) is the encoder input and the last reply is the decoder's labels, each
truncated to its own length. Truncation keeps the beginning: a long chat (KdConv, CrossWOZ: ~20
turns) keeps its first turns, each reply among them labelled.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.base import LMDataModule
from datamodules.formats import DataError, to_messages
from datamodules.sources import Source, parse_sources, weighted
from lmlab.core.collate import IGNORE_INDEX
from lmlab.core.tokenizer import encoder_ids, render_prompt, require_chat_template

log = logging.getLogger(__name__)


def render_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None = None
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_response) segments, rendered with ``chat_template`` (None:
    the tokenizer's own).

    The text before each assistant turn (including its header, i.e. the generation prompt)
    is a prompt segment; the assistant turn itself (content and the template's end token)
    is a response segment. Works for any template whose renderings of growing prefixes are
    prefixes of each other, and says so when a template is not.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:i], chat_template)
        after = tokenizer.apply_chat_template(messages[: i + 1], chat_template=chat_template, tokenize=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(
                "the chat template does not render growing conversations as growing prefixes, so prompt and "
                "response tokens cannot be told apart; use a template like those in conf/template/"
            )
        segments.append((before[len(done) :], False))
        segments.append((after[len(before) :], True))
        done = after
    return segments


def first_exchange(messages: list[dict]) -> int:
    """The index of the first reply: a conversation's prompt is everything before it (ROUGE, judge, DPO pairs)."""
    return next(i for i, m in enumerate(messages) if m["role"] == "assistant")


def rendered_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering of ``messages`` and the character span (start, end) of each response segment in it."""
    text, spans = "", []
    for segment, is_response in render_segments(tokenizer, messages, chat_template):
        if is_response:
            spans.append((len(text), len(text) + len(segment)))
        text += segment
    return text, spans


def encode_labelled(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: Sequence[tuple[int, int]], max_length: int
) -> dict[str, torch.Tensor]:
    """``text`` encoded once, as a whole, with labels on the tokens that start inside one of ``spans``.

    The whole text is encoded, never its segments one by one, so training sees exactly the ids that inference
    gives the same text (a Metaspace tokenizer would start every separately encoded segment with its "▁").
    A token is a label when its first character lies in a span: a token that straddles a prompt/response
    boundary (BPE merged across it, e.g. under template=plain, where the response follows the prompt with no
    separator) belongs to the side it starts on. Cut to ``max_length``, which keeps the first turns.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"][:max_length]
    in_span = [False] * (len(text) + 1)
    for start, end in spans:
        in_span[start:end] = [True] * (end - start)
    labels = [
        token if in_span[first] else IGNORE_INDEX
        for token, (first, _) in zip(input_ids, encoding["offset_mapping"], strict=False)  # offsets: uncut
    ]
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids of the whole rendering and labels on every reply (-100 on prompt tokens unless
    ``train_on_prompt``), cut to max_length."""
    text, spans = rendered_spans(tokenizer, messages, chat_template)
    return encode_labelled(tokenizer, text, [(0, len(text))] if train_on_prompt else spans, max_length)


def continuation_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` tokenized as text that follows other text, as a decoder generates a reply after its start token.

    Encoded alone, a Metaspace tokenizer (bpe=char) would prepend "▁" to the reply ("▁It", or a lone "▁"
    before a digit), which the reply never has inside a conversation. Behind a special token the reply no
    longer starts the text, so it gets no "▁"; that token is then dropped. Byte-level tokenizers are unchanged.
    """
    ids = tokenizer.encode(tokenizer.eos_token + text, add_special_tokens=False)
    if ids[0] != tokenizer.eos_token_id:
        raise ValueError(f"the tokenizer splits its EOS token {tokenizer.eos_token!r}; it must be a special token")
    return ids[1:]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    max_target_length: int,
    chat_template: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encoder input_ids (everything before the last reply) and decoder labels (the last reply and its end)."""
    segments = render_segments(tokenizer, messages, chat_template)
    source = "".join(text for text, _ in segments[:-1])
    target = continuation_ids(tokenizer, segments[-1][0])[:max_target_length]
    return {"input_ids": encoder_ids(tokenizer, source, max_length), "labels": torch.tensor(target, dtype=torch.long)}


class ListDataset(Dataset):
    def __init__(self, samples: list[dict[str, torch.Tensor]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


class SFTDataModule(LMDataModule):
    """Prompt/response or chat records from jsonl/json/parquet/csv files, tokenized in memory.

    ``train_files`` may be a weighted mixture (datamodules/sources.py); see :meth:`split` for how weights and
    the held-out validation combine.
    """

    packable = True

    def __init__(
        self,
        train_files: Sequence[str | dict],
        val_files: Sequence[str | dict] | None = None,
        val_fraction: float = 0.05,
        format: str = "auto",
        chat_template: str | None = None,
        max_target_length: int | None = None,
        train_on_prompt: bool = False,
        split_seed: int = 42,
        on_error: str = "raise",
    ):
        super().__init__(train_files, val_files, val_fraction, format, on_error, split_seed)
        self.own_chat_template = chat_template  # the preset's own layout; None: the run's (connect)
        self.chat_template: str | None = None  # what the samples are rendered with (connect)
        self.max_target_length = max_target_length
        self.train_on_prompt = train_on_prompt
        self._split: tuple[list, list] | None = None

    def connect(
        self, tokenizer: PreTrainedTokenizerBase, *, arch: str, chat_template: str | None = None, **run
    ) -> None:
        """:meth:`LMDataModule.connect`; the samples are rendered with the preset's own chat template, else the
        run's ``chat_template`` (None: the tokenizer's)."""
        if arch == "seq2seq" and self.train_on_prompt:
            raise ValueError(
                "data.train_on_prompt applies to causal models: an encoder-decoder reads the prompt "
                "with its encoder and has no labels there"
            )
        super().connect(tokenizer, arch=arch, **run)
        self.chat_template = self.own_chat_template or chat_template

    @property
    def target_length(self) -> int:
        """Seq2seq: the decoder's tokens per reply, ``max_target_length`` (None: the run's max length)."""
        return self.max_length if self.max_target_length is None else self.max_target_length

    def _read(self, files: Sequence[str | Source]) -> list[tuple[str, int, list[dict]]]:
        return list(self.records(files, to_messages))

    def split(self) -> tuple[list, list]:
        """(train, val) records (source, line, example).

        Without val files a shuffle seeded with ``split_seed`` holds out ``val_fraction`` of all training records,
        from every source alike and before weighting, so no copy of a validation record is trained on. Each source's
        remaining records then go into the epoch ``weight`` times (:func:`datamodules.sources.weighted`: whole
        repeats, and a subsample seeded by ``split_seed`` and the source's position for a fraction). Validation is
        never weighted: it measures the sources as they are. ``val_files`` entries may be mappings with their own
        ``format`` and ``fill``, like ``train_files`` (a weight there is refused). Both are decided before
        :meth:`connect` (a tokenizer may be trained on this text), so they depend on data fields alone.
        """
        if self._split is None:
            per_source = [self._read([source]) for source in self.sources]
            if self.val_files:
                val = self._read(self._val_sources())
            else:
                val, per_source = self._hold_out(per_source)
            epoch = [
                weighted(records, source.weight, self.split_seed + i)
                for i, (source, records) in enumerate(zip(self.sources, per_source, strict=True))
            ]
            train = [record for records in epoch for record in records]
            if not train or not val:
                raise DataError(", ".join(self.train_files), None, "no usable records for training and validation")
            log.info(
                "data: %s; %d validation records",
                ", ".join(
                    f"{source.label} {len(records)} records x {source.weight:g} = {len(taken)}"
                    for source, records, taken in zip(self.sources, per_source, epoch, strict=True)
                ),
                len(val),
            )
            self._split = (train, val)
        return self._split

    def _hold_out(self, per_source: list[list]) -> tuple[list, list[list]]:
        """(held-out records, each source's other records): a seeded shuffle over all records keeps val_fraction."""
        total = sum(len(records) for records in per_source)
        order = list(range(total))
        random.Random(self.split_seed).shuffle(order)
        held = set(order[: max(1, int(total * self.val_fraction))])
        val, kept, position = [], [], 0
        for records in per_source:
            val += [r for i, r in enumerate(records, start=position) if i in held]
            kept.append([r for i, r in enumerate(records, start=position) if i not in held])
            position += len(records)
        return val, kept

    def _val_sources(self) -> list[Source]:
        """``val_files`` as Sources, one by one: validation files need no distinct names (nothing is logged per
        validation source), and a weight there would be ignored, so it is refused."""
        sources = [parse_sources([entry])[0] for entry in self.val_files]
        for i, source in enumerate(sources):
            if source.weight != 1:
                raise ValueError(
                    f"data.val_files[{i}].weight: weights shape the training epoch only; "
                    "validation reads every record once"
                )
        return sources

    def iter_texts(self) -> Iterator[str]:
        for _, _, messages in self.split()[0]:
            for m in messages:
                yield m["content"] + ("\n" + m["input"] if m.get("input") else "")

    def examples(self) -> tuple[list, list]:
        """(train, val) lists of (source, line, example...) to tokenize: here the conversations."""
        return self.split()

    def tokenize(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        """One example as a training sample (the layout follows ``arch``)."""
        if self.arch == "seq2seq":
            return tokenize_pair(self.tokenizer, messages, self.max_length, self.target_length, self.chat_template)
        return tokenize_conversation(
            self.tokenizer, messages, self.max_length, self.train_on_prompt, self.chat_template
        )

    @staticmethod
    def has_answer(sample: dict) -> bool:
        """Whether a label token survived truncation (an all -100 sample would make a NaN mean loss)."""
        return bool((sample["labels"] != IGNORE_INDEX).any())

    def skip_reason(self, sample: dict) -> str | None:
        """Why a tokenized sample cannot be trained on (it is dropped and counted), or None."""
        if not self.has_answer(sample):
            return f"samples with no answer token left after truncation to {self.max_length}"
        return None

    def _tokenize_all(self, examples: list) -> ListDataset:
        samples = []
        for source, line, *example in examples:
            try:
                sample = self.tokenize(*example)
            except Exception as e:  # a template error on this record: name it
                raise DataError(source, line, f"cannot render with the chat template: {e}") from e
            reason = self.skip_reason(sample)
            if reason:
                self.skips.add(reason)
                continue
            samples.append(sample)
        return ListDataset(samples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.chat_template:
            require_chat_template(self.tokenizer)
        train, val = self.examples()
        train_set, val_set = self._tokenize_all(train), self._tokenize_all(val)
        self.log_skips()
        val_files = [s.path for s in self._val_sources()] if self.val_files else self.train_files
        for split, examples, dataset, files in (
            ("train", train, train_set, self.train_files),
            ("val", val, val_set, val_files),
        ):
            if not len(dataset):  # say why here, not as the loader's "num_samples=0"
                raise DataError(
                    ", ".join(files),
                    None,
                    f"none of the {len(examples)} {split} samples keeps an answer token after truncation to "
                    f"seq_len={self.max_length}: raise seq_len (or data.max_target_length), or shorten the prompts",
                )
        self.train_set, self.val_set = train_set, val_set

    def source_set(self, split: str, name: str) -> ListDataset:
        """The ``split``'s samples of one training source, by its name: e.g. a mixture's held-out Alpaca rows,
        so a model trained on the mixture can be compared on them with one that was not (eval.py source=...)."""
        paths = {str(Path(s.path)) for s in self.sources if s.label == name}
        if not paths:
            raise ValueError(f"source={name!r}: the preset's sources are {[s.label for s in self.sources]}")
        train, val = self.examples()
        return self._tokenize_all([e for e in (val if split == "val" else train) if e[0] in paths])

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """Validation conversations up to their first reply (rendered, with the reply header), and that reply."""
        pairs = []
        for _, _, messages in self.split()[1][:n]:
            first = first_exchange(messages)
            pairs.append((self.render_prompt(messages[:first]), messages[first]["content"]))
        return pairs

    def render_prompt(self, messages: list[dict]) -> str:
        """``messages`` as a prompt in this data's chat template (``chat_template``, else the tokenizer's)."""
        return render_prompt(self.tokenizer, messages, self.chat_template)
