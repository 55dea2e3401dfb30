"""ROUGE-1/2/L F1 for Chinese and English summaries, on top of google's ``rouge_score``.

``rouge_score``'s default tokenizer keeps only ``[a-z0-9]`` and drops every other character, so a Chinese summary
has no tokens and scores 0 against anything, itself included. Chinese has no spaces between words, so here it is
scored per character (``segmentation="char"``); Latin text and digits in the same string stay word-level.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

from rouge_score import rouge_scorer, tokenizers

SEGMENTATIONS = ("char", "word")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# Scripts written without spaces between words: each character is one token.
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3134F),  # CJK Unified Ideographs Extensions B-G, Compatibility Supplement
)


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


class CharTokenizer:
    """One token per CJK character, one per run of other letters/digits; punctuation and spaces are dropped.

    Needed because ``rouge_score``'s default tokenizer keeps only ``[a-z0-9]``, so Chinese text has no tokens and
    scores 0. Text is NFKC-normalised and lowercased first, so full-width ``ＡＢＣ１２`` counts the same as ``abc12``.
    """

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        run: list[str] = []
        for ch in unicodedata.normalize("NFKC", text).lower():
            if ch.isalnum() and not _is_cjk(ch):
                run.append(ch)
                continue
            if run:
                tokens.append("".join(run))
                run = []
            if ch.isalnum():  # a CJK character; CJK punctuation such as ・ is not alphanumeric and is dropped
                tokens.append(ch)
        if run:
            tokens.append("".join(run))
        return tokens


def rouge_tokenizer(segmentation: str) -> CharTokenizer | tokenizers.DefaultTokenizer:
    """The tokenizer for ``segmentation``: ``"char"`` (any language) or ``"word"`` (rouge_score's default; English
    only, it drops every non-``[a-z0-9]`` character, CJK included)."""
    if segmentation == "char":
        return CharTokenizer()
    if segmentation == "word":
        return tokenizers.DefaultTokenizer(use_stemmer=False)
    raise ValueError(f"unknown ROUGE segmentation {segmentation!r}; expected one of {SEGMENTATIONS}")


@functools.cache
def _scorer(segmentation: str) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=rouge_tokenizer(segmentation))


def pair_f1(prediction: str, reference: str, segmentation: str = "char") -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against its reference; 0 where either side has no tokens."""
    scores = _scorer(segmentation).score(target=reference, prediction=prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def rouge_scores(
    predictions: Sequence[str], references: Sequence[str], segmentation: str = "char"
) -> dict[str, float | int | str]:
    """Mean ROUGE-1/2/L F1 over prediction/reference pairs, plus ``n`` (pairs) and ``segmentation``, so a logged
    score says how it was computed."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no prediction/reference pairs to score")
    pairs = [pair_f1(p, r, segmentation) for p, r in zip(predictions, references, strict=True)]
    result: dict[str, float | int | str] = {name: sum(s[name] for s in pairs) / len(pairs) for name in ROUGE_TYPES}
    result["n"] = len(pairs)
    result["segmentation"] = segmentation
    return result
