"""T5 span corruption: mask counts and shape, lossless inputs/targets, sentinels, per-item determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.span_corruption import (
    SpanCorruption,
    corrupt_spans,
    expected_lengths,
    random_spans_noise_mask,
    sentinel_token_ids,
)

SENTINELS = list(range(1000, 1300))  # more than the 256 spans of the densest case
EOS = 2
CASES = [
    (length, density, span)
    for length in (2, 3, 10, 64, 257, 512)
    for density, span in ((0.15, 3.0), (0.5, 1.0), (0.3, 8.0), (0.01, 3.0), (0.99, 2.0))
]


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """(value, length) of each run of equal values, start to end."""
    out: list[tuple[bool, int]] = []
    for value in mask.tolist():
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


def counts(length: int, density: float, span: float) -> tuple[int, int]:
    """The (noise tokens, noise spans) the spec asks for, computed independently of the module."""
    noise = min(max(int(np.round(length * density)), 1), length - 1)
    spans = min(max(1, int(np.round(noise / span))), noise, length - noise)
    return noise, spans


def rebuild(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """The original window: each sentinel of inputs replaced by what follows it in targets, eos dropped."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1].tolist():
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out = []
    for token in inputs[:-1].tolist():
        out += spans[token] if token in SENTINELS else [token]
    return out


@pytest.mark.parametrize("length,density,span", CASES)
def test_mask_counts_and_shape(length, density, span):
    noise, spans = counts(length, density, span)
    for seed in range(5):
        mask = random_spans_noise_mask(length, density, span, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (length,)
        assert mask.sum() == noise
        assert not mask[0]
        noise_runs = [n for value, n in runs(mask) if value]
        assert len(noise_runs) == spans
        assert all(n >= 1 for n in noise_runs)


def test_mask_mean_span_length():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(300):
        mask = random_spans_noise_mask(512, 0.15, 3.0, rng)
        lengths += [n for value, n in runs(mask) if value]
    assert abs(np.mean(lengths) - 3.0) < 0.15 * 3.0
    # uniform random segmentation gives roughly geometric span lengths: about a third are single tokens
    assert 0.2 < np.mean(np.array(lengths) == 1) < 0.45


def test_mask_is_random_but_seeded():
    a = random_spans_noise_mask(128, 0.15, 3.0, np.random.default_rng(1))
    b = random_spans_noise_mask(128, 0.15, 3.0, np.random.default_rng(1))
    c = random_spans_noise_mask(128, 0.15, 3.0, np.random.default_rng(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("length,density,span", CASES)
def test_corrupt_spans_round_trip(length, density, span):
    for seed in range(5):
        tokens = np.random.default_rng(100 + seed).integers(3, 1000, size=length)
        inputs, targets = corrupt_spans(tokens, SENTINELS, EOS, density, span, np.random.default_rng(seed))
        assert inputs.dtype == np.int64 and targets.dtype == np.int64
        assert rebuild(inputs, targets) == tokens.tolist()
        assert (len(inputs), len(targets)) == expected_lengths(length, density, span)
        _, spans = counts(length, density, span)
        assert [t for t in inputs.tolist() if t in SENTINELS] == SENTINELS[:spans]
        assert [t for t in targets.tolist() if t in SENTINELS] == SENTINELS[:spans]
        assert targets[0] == SENTINELS[0]
        assert inputs[0] == tokens[0]


def test_corrupt_spans_known_example():
    """With one span the layout is fixed: inputs = kept prefix, <s0>, eos; targets = <s0>, span, eos."""
    tokens = np.arange(10, 20)
    inputs, targets = corrupt_spans(tokens, [7], EOS, 0.3, 10.0, np.random.default_rng(0))
    mask = random_spans_noise_mask(10, 0.3, 10.0, np.random.default_rng(0))
    assert targets.tolist() == [7, *tokens[mask].tolist(), EOS]
    start = int(np.argmax(mask))
    assert inputs.tolist() == [*tokens[:start].tolist(), 7, EOS]  # one span, and the mask ends with noise


def test_expected_lengths_values():
    assert expected_lengths(512, 0.15, 3.0) == (512 - 77 + 26 + 1, 77 + 26 + 1)
    assert expected_lengths(2, 0.5, 3.0) == (3, 3)


def test_too_few_sentinels_raises():
    with pytest.raises(ValueError, match="sentinel") as err:
        corrupt_spans(np.arange(512), SENTINELS[:3], EOS, 0.15, 3.0, np.random.default_rng(0))
    assert "26 noise spans" in str(err.value) and "3 sentinel" in str(err.value)


def test_too_short_window_raises():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        random_spans_noise_mask(1, 0.15, 3.0, np.random.default_rng(0))


def tiny_tokenizer(special: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", additional_special_tokens=special
    )


def test_sentinel_token_ids_in_order():
    tok = tiny_tokenizer(["<extra_id_1>", "<extra_id_0>", "<extra_id_2>", "<extra_id_4>"])
    ids = sentinel_token_ids(tok)
    assert ids == tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"])
    assert len(set(ids)) == 3 and tok.unk_token_id not in ids


def test_sentinel_token_ids_missing_raises():
    with pytest.raises(ValueError, match="bpe.sentinel_tokens"):
        sentinel_token_ids(tiny_tokenizer([]))


class Windows(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int):
        gen = torch.Generator().manual_seed(0)
        self.data = [torch.randint(3, 1000, (length,), generator=gen) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": torch.zeros(1)}


def test_span_corruption_dataset():
    windows = Windows(8, 65)
    ds = SpanCorruption(windows, SENTINELS, EOS, 0.15, 3.0, seed=0)
    assert len(ds) == 8
    later = ds[5]
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
        assert (len(item["input_ids"]), len(item["labels"])) == expected_lengths(65, 0.15, 3.0)
        assert rebuild(item["input_ids"].numpy(), item["labels"].numpy()) == windows[i]["input_ids"].tolist()
    again = ds[5]
    assert torch.equal(later["input_ids"], again["input_ids"]) and torch.equal(later["labels"], again["labels"])

    fresh = SpanCorruption(windows, SENTINELS, EOS, 0.15, 3.0, seed=0)[5]  # order and instance do not matter
    assert torch.equal(fresh["input_ids"], later["input_ids"])
    other_seed = SpanCorruption(windows, SENTINELS, EOS, 0.15, 3.0, seed=1)
    assert any(not torch.equal(other_seed[i]["input_ids"], ds[i]["input_ids"]) for i in range(len(ds)))


def test_span_corruption_masks_differ_between_items():
    windows = Windows(1, 65)
    same = SpanCorruption([windows[0]] * 8, SENTINELS, EOS, 0.15, 3.0, seed=0)  # one window, eight items
    assert len({tuple(same[i]["input_ids"].tolist()) for i in range(len(same))}) > 1


def test_each_pass_over_a_window_gets_a_fresh_mask():
    windows = Windows(3, 65)
    ds = SpanCorruption(windows, SENTINELS, EOS, 0.15, 3.0, seed=0, passes=4)
    assert len(ds) == 12
    for w in range(3):
        passes = [ds[w + 3 * k] for k in range(4)]
        assert all(
            rebuild(p["input_ids"].numpy(), p["labels"].numpy()) == windows[w]["input_ids"].tolist() for p in passes
        )
        assert len({tuple(p["input_ids"].tolist()) for p in passes}) > 1
    with pytest.raises(IndexError):
        ds[12]
