"""Preference (DPO) data: a prompt with a chosen and a rejected answer, tokenized like SFT.

Records are read by :func:`datamodules.formats.to_preference` ({prompt, chosen, rejected}, Alpaca
with chosen/rejected, conversations ending with the user plus chosen/rejected, or an ``output``
list ranked best first, which gives one pair per lower-ranked answer). Each answer is tokenized
exactly as an SFT reply to the same prompt (causal LM: the whole rendering encoded once,
:func:`datamodules.sft.encode_labelled`; encoder-decoder: :func:`datamodules.sft.tokenize_pair`), with
labels only on the answer and its end token. A batch is 2B rows: the B chosen samples, then the B
rejected ones (:class:`lmlab.core.collate.PreferenceCollator`), and each pair's ``index`` in its split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from datamodules.formats import to_preference
from datamodules.sft import SFTDataModule, encode_labelled, rendered_spans, tokenize_pair
from datamodules.sources import Source
from lmlab.core.collate import PreferenceCollator


def _tokenize_answer(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict],
    answer: str,
    max_length: int,
    max_target_length: int,
    arch: str,
) -> dict[str, torch.Tensor]:
    messages = [*prompt, {"role": "assistant", "content": answer}]
    if arch == "seq2seq":
        return tokenize_pair(tokenizer, messages, max_length, max_target_length)
    # earlier replies of a multi-turn prompt are context, not the answer being compared: labels on the last only
    text, spans = rendered_spans(tokenizer, messages)
    return encode_labelled(tokenizer, text, spans[-1:], max_length)


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict],
    chosen: str,
    rejected: str,
    max_length: int,
    max_target_length: int,
    arch: str = "causal",
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"chosen": sample, "rejected": sample}``, each the SFT sample of ``prompt`` answered by that answer.

    causal: aligned input_ids/labels cut to ``max_length``, labels -100 on every prompt token (earlier
    assistant turns included) and set on the answer and its EOS. seq2seq: the prompt (with the reply
    header) and EOS as encoder input_ids, the answer and EOS as labels cut to ``max_target_length``.
    """
    return {
        name: _tokenize_answer(tokenizer, prompt, answer, max_length, max_target_length, arch)
        for name, answer in (("chosen", chosen), ("rejected", rejected))
    }


class PreferenceDataModule(SFTDataModule):
    """Preference records from jsonl/json/parquet/csv files, tokenized in memory as chosen/rejected pairs.

    Everything but the examples is SFT's (reading, the seeded hold-out over records, so the pairs
    of one ranked record stay together, mixture weights, the template, truncation, skips). Dataset items are
    ``{"chosen": sample, "rejected": sample, "index": i}`` with ``i`` the item's position in its
    split; a pair where either answer has no label token left after truncation is dropped and
    counted in ``self.skips``. The constructor is SFTDataModule's (``train_on_prompt`` has no effect).
    """

    _pairs: tuple[list, list] | None = None  # examples(), built once

    def _read(self, files: Sequence[str | Source]) -> list[tuple[str, int, list[tuple[list[dict], str, str]]]]:
        return list(self.records(files, to_preference))

    def examples(self) -> tuple[list, list]:
        """(train, val) lists of (source, line, prompt, chosen, rejected), the records' pairs in order."""
        if self._pairs is None:
            self._pairs = tuple(
                [(source, line, *pair) for source, line, record_pairs in records for pair in record_pairs]
                for records in self.split()
            )
        return self._pairs

    def iter_texts(self) -> Iterator[str]:
        seen_prompts = set()
        for _, _, prompt, chosen, rejected in self.examples()[0]:
            key = id(prompt)  # the pairs of a ranked record share one prompt list: yield it once
            if key not in seen_prompts:
                seen_prompts.add(key)
                for m in prompt:
                    yield m["content"] + ("\n" + m["input"] if m.get("input") else "")
            yield chosen
            yield rejected

    def tokenize(self, prompt: list[dict], chosen: str, rejected: str) -> dict[str, dict[str, torch.Tensor]]:
        return tokenize_preference(
            self.tokenizer, prompt, chosen, rejected, self.max_length, self.max_target_length, self.arch
        )

    @staticmethod
    def has_answer(sample: dict) -> bool:
        return all(SFTDataModule.has_answer(sample[side]) for side in ("chosen", "rejected"))

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(super().collator())

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """The first n validation prompts (rendered, with the reply header) and their chosen answers."""
        return [
            (self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), chosen)
            for _, _, prompt, chosen, _ in self.examples()[1][:n]
        ]
