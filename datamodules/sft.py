"""Supervised fine-tuning data: prompt/response and multi-turn chat, with -100 label masking.

Every template is a Jinja chat template (conf/template/), so Alpaca, ChatML-style and the
babyllama 资料/人类/助手 layouts are one mechanism, and the exported tokenizer formats
prompts the same way outside lmlab (``tokenizer.apply_chat_template``). A conversation is
cut into segments by rendering growing prefixes of it; only assistant segments (content +
EOS) are labels, unless ``train_on_prompt`` is set. For an encoder-decoder the conversation up to
its last reply (with the reply's header) is the encoder input and the last reply is the decoder's
labels, each truncated to its own length.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.base import LMDataModule
from datamodules.collate import IGNORE_INDEX
from datamodules.formats import DataError, to_messages


def render_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_response) segments.

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
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(
                "the chat template does not render growing conversations as growing prefixes, so prompt and "
                "response tokens cannot be told apart; use a template like those in conf/template/"
            )
        segments.append((before[len(done):], False))
        segments.append((after[len(before):], True))
        done = after
    return segments


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    max_length: int,
    train_on_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """input_ids and labels (-100 on prompt tokens unless ``train_on_prompt``), cut to max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in render_segments(tokenizer, messages):
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return {
        "input_ids": torch.tensor(input_ids[:max_length], dtype=torch.long),
        "labels": torch.tensor(labels[:max_length], dtype=torch.long),
    }


def encoder_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None) -> torch.Tensor:
    """An encoder input: the text's tokens cut to ``max_length - 1``, then EOS (T5's convention).

    Training and generation both encode prompts through this, so they see the same input.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_length is not None:
        ids = ids[: max_length - 1]
    return torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int, max_target_length: int
) -> dict[str, torch.Tensor]:
    """Encoder input_ids (everything before the last reply) and decoder labels (the last reply and its end)."""
    segments = render_segments(tokenizer, messages)
    source = "".join(text for text, _ in segments[:-1])
    target = tokenizer.encode(segments[-1][0], add_special_tokens=False)[:max_target_length]
    return {"input_ids": encoder_ids(tokenizer, source, max_length), "labels": torch.tensor(target, dtype=torch.long)}


class ListDataset(Dataset):
    def __init__(self, samples: list[dict[str, torch.Tensor]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


class SFTDataModule(LMDataModule):
    """Prompt/response or chat records from jsonl/json/parquet/csv files, tokenized in memory."""

    def __init__(
        self,
        train_files: Sequence[str],
        val_files: Sequence[str] | None = None,
        val_fraction: float = 0.05,
        format: str = "auto",
        chat_template: str | None = None,
        max_length: int = 512,
        max_target_length: int = 512,
        train_on_prompt: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        pad_to_multiple_of: int = 1,
        seed: int = 0,
        on_error: str = "raise",
        arch: str = "causal",
    ):
        super().__init__(train_files, val_files, val_fraction, format, batch_size, num_workers, pad_to_multiple_of,
                         seed, on_error, arch)
        if arch == "seq2seq" and train_on_prompt:
            raise ValueError("data.train_on_prompt applies to causal models: an encoder-decoder reads the prompt "
                             "with its encoder and has no labels there")
        self.chat_template = chat_template
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.train_on_prompt = train_on_prompt
        self._split: tuple[list, list] | None = None

    def _read(self, files: Sequence[str]) -> list[tuple[str, int, list[dict]]]:
        return list(self.records(files, to_messages))

    def split(self) -> tuple[list, list]:
        """(train, val) conversations; a seeded shuffle holds out val_fraction when no val file is given."""
        if self._split is None:
            train = self._read(self.train_files)
            if self.val_files:
                val = self._read(self.val_files)
            else:
                order = list(range(len(train)))
                random.Random(self.seed).shuffle(order)
                n_val = max(1, int(len(train) * self.val_fraction))
                held = set(order[:n_val])
                val = [c for i, c in enumerate(train) if i in held]
                train = [c for i, c in enumerate(train) if i not in held]
            if not train or not val:
                raise DataError(", ".join(self.train_files), None, "no usable records for training and validation")
            self._split = (train, val)
        return self._split

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
            return tokenize_pair(self.tokenizer, messages, self.max_length, self.max_target_length)
        return tokenize_conversation(self.tokenizer, messages, self.max_length, self.train_on_prompt)

    @staticmethod
    def has_answer(sample: dict) -> bool:
        """Whether a label token survived truncation (an all -100 sample would make a NaN mean loss)."""
        return bool((sample["labels"] != IGNORE_INDEX).any())

    def _tokenize_all(self, examples: list) -> ListDataset:
        samples = []
        for source, line, *example in examples:
            try:
                sample = self.tokenize(*example)
            except Exception as e:  # a template error on this record: name it
                raise DataError(source, line, f"cannot render with the chat template: {e}") from e
            if not self.has_answer(sample):
                self.skips.add(f"samples with no answer token left after truncation to {self.max_length}")
                continue
            samples.append({**sample, "index": len(samples)})  # the position in its split (DPO's cached logps)
        return ListDataset(samples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        if not self.tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template: choose one with template=chatml|alpaca|babyllama")
        train, val = self.examples()
        self.train_set = self._tokenize_all(train)
        self.val_set = self._tokenize_all(val)
        self.log_skips()

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """Validation conversations up to their first reply (rendered, with the reply header), and that reply."""
        pairs = []
        for _, _, messages in self.split()[1][:n]:
            first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = self.tokenizer.apply_chat_template(messages[:first_reply], tokenize=False,
                                                        add_generation_prompt=True)
            pairs.append((prompt, messages[first_reply]["content"]))
        return pairs
