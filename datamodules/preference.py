"""Preference (DPO) data: a prompt with a chosen and a rejected answer, tokenized like SFT.

Records are read by :func:`datamodules.formats.to_preference` ({prompt, chosen, rejected}, Alpaca
with chosen/rejected, conversations ending with the user plus chosen/rejected, or an ``output``
list ranked best first, which gives one pair per lower-ranked answer). Each answer is tokenized
exactly as an SFT reply to the same prompt (causal LM: the whole rendering encoded once,
:func:`datamodules.sft.encode_labelled`; encoder-decoder: :func:`datamodules.sft.tokenize_pair`), with
labels only on the answer and its end token. A batch is 2B rows: the B chosen samples, then the B
rejected ones (:class:`lmlab.core.collate.PreferenceCollator`).
With a precomputed reference (DPO's ``reference: precomputed``), :meth:`PreferenceDataModule.add_reference_logps`
gives every pair its reference log-probs as item fields, which the collator puts in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.formats import to_preference
from datamodules.sft import SFTDataModule, encode_labelled, rendered_spans, tokenize_pair
from datamodules.sources import Source
from lmlab.core.collate import REF_LOGPS, PreferenceCollator


def _tokenize_answer(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict],
    answer: str,
    max_length: int,
    max_target_length: int,
    arch: str,
    chat_template: str | None,
) -> dict[str, torch.Tensor]:
    messages = [*prompt, {"role": "assistant", "content": answer}]
    if arch == "seq2seq":
        return tokenize_pair(tokenizer, messages, max_length, max_target_length, chat_template)
    # earlier replies of a multi-turn prompt are context, not the answer being compared: labels on the last only
    text, spans = rendered_spans(tokenizer, messages, chat_template)
    return encode_labelled(tokenizer, text, spans[-1:], max_length)


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict],
    chosen: str,
    rejected: str,
    max_length: int,
    max_target_length: int,
    arch: str = "causal",
    chat_template: str | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"chosen": sample, "rejected": sample}``, each the SFT sample of ``prompt`` answered by that answer
    (rendered with ``chat_template``; None: the tokenizer's own).

    causal: aligned input_ids/labels cut to ``max_length``, labels -100 on every prompt token (earlier
    assistant turns included) and set on the answer and its EOS. seq2seq: the prompt (with the reply
    header) and EOS as encoder input_ids, the answer and EOS as labels cut to ``max_target_length``.
    """
    return {
        name: _tokenize_answer(tokenizer, prompt, answer, max_length, max_target_length, arch, chat_template)
        for name, answer in (("chosen", chosen), ("rejected", rejected))
    }


class PreferenceDataModule(SFTDataModule):
    """Preference records from jsonl/json/parquet/csv files, tokenized in memory as chosen/rejected pairs.

    Everything but the examples is SFT's (reading, the seeded hold-out over records, so the pairs
    of one ranked record stay together, mixture weights, the template, truncation, skips). Dataset items are
    ``{"chosen": sample, "rejected": sample}`` (and the reference's log-probs after :meth:`add_reference_logps`);
    a pair where either answer has no label token left after truncation is dropped and counted in ``self.skips``.
    The constructor is SFTDataModule's (``train_on_prompt`` has no effect).
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
            self.tokenizer,
            prompt,
            chosen,
            rejected,
            self.max_length,
            self.target_length,
            self.arch,
            self.chat_template,
        )

    @staticmethod
    def has_answer(sample: dict) -> bool:
        return all(SFTDataModule.has_answer(sample[side]) for side in ("chosen", "rejected"))

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(super().collator())

    def add_reference_logps(
        self, reference_logps: Callable[[str, Dataset, Iterable[dict[str, torch.Tensor]]], torch.Tensor]
    ) -> None:
        """Give every pair of both splits its reference log-probs as item fields ``ref_chosen_logps`` and
        ``ref_rejected_logps`` (TRL's _precompute_ref_logps adds them as dataset columns); the collator then
        puts them in every batch, so a training step needs no reference model.

        ``reference_logps(split, dataset, batches)`` returns a [len(dataset), 2] tensor, (chosen, rejected) per
        pair in the dataset's order: ``batches`` are the split's pairs in that order, collated as for training and
        only built when iterated, so the caller may compute them or take them from a cache keyed on ``dataset``.
        The items are replaced in place, so loaders already built over the splits see the new fields.
        """
        if self.train_set is None:
            raise RuntimeError("add_reference_logps needs the datasets: call setup() first")
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            batches = DataLoader(dataset, batch_size=self.batch_size, collate_fn=self.collator())
            logps = reference_logps(split, dataset, batches)
            if tuple(logps.shape) != (len(dataset), 2):
                raise ValueError(f"{split}: reference log-probs of shape {tuple(logps.shape)}, not ({len(dataset)}, 2)")
            for i, pair in enumerate(logps.detach().float().cpu().tolist()):
                dataset.samples[i] = {**dataset.samples[i], **dict(zip(REF_LOGPS, pair, strict=True))}

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """The first n validation prompts (rendered, with the reply header) and their chosen answers."""
        return [(self.render_prompt(prompt), chosen) for _, _, prompt, chosen, _ in self.examples()[1][:n]]
