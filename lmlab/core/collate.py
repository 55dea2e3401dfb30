"""Batching: pad to the batch's longest sample; for a causal LM, then shift so labels are next-token targets."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
PAD_SIDES = ("left", "right")


def pad(rows: Sequence[torch.Tensor | Sequence[int]], value: int, width: int, side: str = "right") -> torch.Tensor:
    """1-D rows (tensors or lists of ids) padded with ``value`` into one LongTensor[len(rows), width].

    ``side="right"``: each row starts at column 0 and the padding follows it (training batches, encoder
    inputs); ``"left"``: each row ends at the last column (causal prompts, so that generated tokens follow
    them). The one padding of lmlab: the collators and generation's prompt batches all pad here.
    """
    if side not in PAD_SIDES:
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        out[i, cols] = torch.as_tensor(row)
    return out


def padding_mask(rows: Sequence[torch.Tensor | Sequence[int]], width: int, side: str = "right") -> torch.Tensor:
    """The attention mask of ``pad(rows, value, width, side)``: 1 on each row's own tokens, 0 on its padding."""
    return pad([torch.ones(len(row), dtype=torch.long) for row in rows], 0, width, side)


def round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


class CausalCollator:
    """Pads ``input_ids`` with ``pad_id`` and ``labels`` with -100, then shifts by one.

    Samples hold aligned ``input_ids``/``labels`` (the Hugging Face convention, which the
    mask tests read). The batch holds ``input_ids[:, :-1]`` and ``labels[:, 1:]``, so a
    pretraining window of seq_len+1 tokens feeds exactly seq_len positions to the model and
    the loss needs no further shifting. The padded length minus one is rounded up to
    ``pad_to_multiple_of`` (8 or 64 suits tensor cores; 1 disables it).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = [s["input_ids"] for s in samples]
        width = round_up(max(len(r) for r in ids) - 1, self.multiple) + 1
        input_ids = pad(ids, self.pad_id, width)
        labels = pad([s["labels"] for s in samples], IGNORE_INDEX, width)
        attention_mask = padding_mask(ids, width)
        return {
            "input_ids": input_ids[:, :-1].contiguous(),
            "attention_mask": attention_mask[:, :-1].contiguous(),
            "labels": labels[:, 1:].contiguous(),
        }


class Seq2SeqCollator:
    """Encoder ``input_ids`` padded with ``pad_id``, decoder ``labels`` padded with -100, each to its own longest.

    No shift here: the encoder-decoder model builds its decoder inputs from the labels (T5:
    the decoder start token, then the labels shifted right, -100 read as pad). Both widths
    are rounded up to ``pad_to_multiple_of``.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = [s["input_ids"] for s in samples]
        labels = [s["labels"] for s in samples]
        width = round_up(max(len(r) for r in ids), self.multiple)
        return {
            "input_ids": pad(ids, self.pad_id, width),
            "attention_mask": padding_mask(ids, width),
            "labels": pad(labels, IGNORE_INDEX, round_up(max(len(r) for r in labels), self.multiple)),
        }


REF_LOGPS = ("ref_chosen_logps", "ref_rejected_logps")  # TRL's names for a pair's precomputed reference log-probs
LABEL_POSITIONS = "label_positions"  # a causal preference batch's flat indices of its label positions


class PreferenceCollator:
    """Preference items ``{"chosen": sample, "rejected": sample}`` as one batch of 2B rows.

    ``inner`` (the arch's collator) batches ``[chosen_1..chosen_B, rejected_1..rejected_B]``, so the
    policy and the reference model each run once over both halves; rows ``:B`` are the chosen answers
    and rows ``B:`` the rejected ones. For an encoder-decoder both halves hold the same encoder input
    with different labels (checked here, on the host: DPO encodes it once, lightning_modules/dpo.preference_logits).
    Items that carry the reference's log-probs (``ref_chosen_logps``,
    ``ref_rejected_logps``: floats or 0-d tensors, computed once before training, as TRL's
    precompute_ref_log_probs adds them as dataset columns) give the batch those fields too,
    FloatTensor[B] each, in the pairs' order. A causal batch (padded or packed) carries ``label_positions``, the flat
    indices of its labels that are not -100 (LongTensor): DPO sends only those positions through the LM head
    (lmlab.core.losses.head_label_logps), and counting them here, on the host, spares the training step a wait for
    the GPU.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if isinstance(self.inner, Seq2SeqCollator):
            for i, item in enumerate(items):
                chosen, rejected = (torch.as_tensor(item[k]["input_ids"]) for k in ("chosen", "rejected"))
                if not torch.equal(chosen, rejected):
                    raise ValueError(
                        f"pair {i} of the batch: its chosen and rejected answers have other encoder inputs"
                    )
        batch = self.inner([item["chosen"] for item in items] + [item["rejected"] for item in items])
        if REF_LOGPS[0] in items[0]:  # all or none: a pair without them raises KeyError here
            for key in REF_LOGPS:
                batch[key] = torch.tensor([float(item[key]) for item in items], dtype=torch.float32)
        if not isinstance(self.inner, Seq2SeqCollator):
            batch[LABEL_POSITIONS] = batch["labels"].flatten().ne(IGNORE_INDEX).nonzero().squeeze(1)
        return batch


class PackedCausalCollator:
    """Padding-free causal batches: the batch's samples end to end in one row, each shifted on its own.

    ``position_ids`` restart at 0 with every sample, which is how transformers 5 tells packed samples apart when no
    attention mask is given (masking_utils.find_packed_sequence_indices): each token attends only to the earlier
    tokens of its own sample, under sdpa and eager through a block-diagonal causal mask, under ``flex_attention``
    (and the flash kernels) without computing the blocks between samples at all. Each sample is shifted before the
    concatenation, so no position predicts the next sample's first token, and the logits and the loss of every
    sample equal those of a padded batch. The row is padded at its end to a multiple of ``pad_to_multiple_of``
    (labels -100, positions counting from 0: a sample of its own that attends to no real token).
    ``document_lengths`` (a list of ints, not a tensor: it stays on the host) gives the samples' lengths, for the
    FLOPs of the attention, which grow with each sample's length and not with the row's.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[int]]:
        ids = [torch.as_tensor(s["input_ids"])[:-1] for s in samples]
        labels = [torch.as_tensor(s["labels"])[1:] for s in samples]
        lengths = [len(row) for row in ids]
        if 0 in lengths:  # no token left to start it (position 0): it would merge with its neighbour
            raise ValueError(f"sample {lengths.index(0)} of the batch has fewer than 2 tokens: nothing to pack")
        return {**pack(ids, self.pad_id, self.multiple), "labels": packed_row(labels, IGNORE_INDEX, self.multiple)}


def packed_row(rows: Sequence[torch.Tensor], fill: int, multiple: int) -> torch.Tensor:
    """``rows`` end to end in one LongTensor[1, L], padded at its end with ``fill`` to a multiple of ``multiple``."""
    total = sum(len(row) for row in rows)
    return torch.cat([*map(torch.as_tensor, rows), torch.full((round_up(total, multiple) - total,), fill)]).long()[None]


def pack(rows: Sequence[torch.Tensor], pad_id: int, multiple: int) -> dict[str, torch.Tensor | list[int] | int]:
    """``rows`` end to end in one row (``input_ids``, packed_row); ``position_ids`` restarting at 0 with every row
    (and the padding tail); ``document_lengths``; ``cu_seq_lens`` (int32) where each row and the tail start, then the
    row's end, and ``max_document_length``: the segments a variable-length attention kernel takes
    (varlen_kwargs). The tail is a segment of its own, empty when there is none, so every position is covered and a
    batch of n samples always has n + 2 bounds. ``max_document_length`` is the longest segment rounded up to
    ``multiple``: the kernel takes any upper bound, and under CUDA graphs (``compile=reduce-overhead``) every distinct
    value is a graph recorded anew."""
    lengths = [len(row) for row in rows]
    if 0 in lengths:
        raise ValueError(f"row {lengths.index(0)} is empty: an empty sample cannot be packed")
    input_ids = packed_row(rows, pad_id, multiple)
    tail = input_ids.shape[1] - sum(lengths)
    segments = [*lengths, tail]
    return {
        "input_ids": input_ids,
        "position_ids": torch.cat([torch.arange(n) for n in segments]).unsqueeze(0),
        "document_lengths": lengths,
        "cu_seq_lens": torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32),
        "max_document_length": round_up(max(segments), multiple),
    }


def varlen_kwargs(batch: dict) -> dict[str, torch.Tensor | int]:
    """A packed batch's segments (pack) as the keyword arguments transformers hands from a model's forward to each
    attention layer (its flash-attention ones: ``cu_seq_lens_q/k``, ``max_length_q/k``); none for a padded batch.
    lmlab's sdpa attention reads them under ``packed_attention=varlen`` (lmlab.core.models.sdpa_settings), and so do
    transformers' flash attentions; sdpa with a mask, eager and flex ignore them and keep the samples apart by their
    ``position_ids``."""
    if "cu_seq_lens" not in batch:
        return {}
    bounds, longest = batch["cu_seq_lens"], batch["max_document_length"]
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def packed_documents(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """A packed batch's (PackedCausalCollator) sample index of every token [1, T], counted where positions restart (the
    padding tail gets the index after the last sample), and its number of samples; None for a padded batch, whose
    samples are its rows."""
    if "document_lengths" not in batch:
        return None
    return batch["position_ids"].eq(0).cumsum(-1) - 1, len(batch["document_lengths"])
