"""T5's span-corruption denoising objective over windows of plain-text token ids.

A window is split into alternating runs of kept and noise tokens (always starting with a
kept run, so the first token survives). The encoder input is the window with each noise
span replaced by one sentinel; the decoder target lists each sentinel followed by the span
it stands for. Ported from ``random_spans_noise_mask`` / ``filter_input_ids`` of Hugging
Face's ``run_t5_mlm_flax.py`` (originally ``t5.data.preprocessors``), one window at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a window: deterministic, so output lengths are known up front."""
    if length < 2:
        raise ValueError(f"span corruption needs windows of at least 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` non-empty segments summing to ``num_items``, uniformly at random.

    Picking distinct cut points among the ``num_items - 1`` gaps between items is what the
    reference's shuffled boolean mask does.
    """
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of ``length`` with round(length * noise_density) True tokens in random spans.

    Noise spans average ``mean_span_length`` tokens, so the model must reconstruct whole
    phrases rather than isolated tokens. The mask starts with kept tokens and alternates.
    """
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    run_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise_run = np.tile([False, True], num_spans)
    return np.repeat(is_noise_run, run_lengths)


def _replace_runs(tokens: np.ndarray, run_mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """``tokens`` with the i-th run of True in ``run_mask`` replaced by the single token ``sentinels[i]``."""
    starts = run_mask & ~np.concatenate([[False], run_mask[:-1]])
    replaced = np.where(starts, sentinels[np.cumsum(starts) - 1], tokens)
    return replaced[~run_mask | starts]


def corrupt_spans(
    tokens: np.ndarray,
    sentinel_ids: Sequence[int],
    eos_id: int,
    noise_density: float,
    mean_span_length: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int64 arrays for one window, each ending with ``eos_id``.

    inputs: the window with noise span i replaced by ``sentinel_ids[i]``. targets: the kept
    runs replaced by sentinels, i.e. ``sentinel_ids[i]`` followed by span i, for every span
    (the mask ends with a noise span, so there is no trailing kept run).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    _, num_spans = _noise_counts(len(tokens), noise_density, mean_span_length)
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"span corruption of {len(tokens)} tokens makes {num_spans} noise spans but the tokenizer has only "
            f"{len(sentinel_ids)} sentinel tokens: lower seq_len or add sentinel tokens"
        )
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    eos = np.array([eos_id], dtype=np.int64)
    inputs = np.concatenate([_replace_runs(tokens, mask, sentinels), eos])
    targets = np.concatenate([_replace_runs(tokens, ~mask, sentinels), eos])
    return inputs, targets


def expected_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths :func:`corrupt_spans` gives for a window of ``length``, to size models and batches."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def sentinel_token_ids(tokenizer: Any) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in order (T5's names), up to the first missing one."""
    vocab = tokenizer.get_vocab()
    ids = []
    while (name := f"<extra_id_{len(ids)}>") in vocab:
        ids.append(vocab[name])
    if not ids:
        raise ValueError(
            "span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer: train one with "
            "bpe.sentinel_tokens=100 (the t5 presets set it) or use a T5 tokenizer"
        )
    return ids


class SpanCorruption(Dataset):
    """Turns windows of plain-text tokens ({"input_ids": LongTensor}) into T5 (input_ids, labels) pairs.

    Item i is window ``i % len(windows)`` corrupted with ``np.random.default_rng([seed, i])``, so
    it is the same whatever order items are read in, in any loader worker, and a resumed run
    sees the same masks. One epoch goes over every window ``passes`` times, each time with a
    fresh mask: a small corpus trained for many passes is not shown the same masks again and
    again. Any "labels" of the wrapped items are ignored.
    """

    def __init__(
        self,
        windows: Dataset,
        sentinel_ids: Sequence[int],
        eos_id: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
        passes: int = 1,
    ):
        self.windows = windows
        self.sentinel_ids = list(sentinel_ids)
        self.eos_id = eos_id
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.seed = seed
        self.passes = passes

    def __len__(self) -> int:
        return len(self.windows) * self.passes

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        tokens = self.windows[i % len(self.windows)]["input_ids"].numpy()
        rng = np.random.default_rng([self.seed, i])
        inputs, targets = corrupt_spans(
            tokens, self.sentinel_ids, self.eos_id, self.noise_density, self.mean_span_length, rng
        )
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(targets)}
