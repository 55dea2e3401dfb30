"""lmlab.eval.rouge: character-level ROUGE for Chinese (rouge_score's default tokenizer scores Chinese 0),
word-level for English, checked against values worked out by hand."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from lmlab.eval.rouge import SEGMENTATIONS, CharTokenizer, pair_f1, rouge_scores, rouge_tokenizer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def f1(overlap: int, n_prediction: int, n_reference: int) -> float:
    """F1 = 2PR / (P + R) with P = overlap / prediction length, R = overlap / reference length."""
    p, r = overlap / n_prediction, overlap / n_reference
    return 2 * p * r / (p + r)


def test_char_tokenizer_mixed_chinese_english_punctuation():
    # CJK characters one each; "Hello", "World", "2024" one token each, lowercased; ，。！ and spaces dropped.
    tokens = CharTokenizer().tokenize("我爱北京天安门。Hello, World 2024！")
    assert tokens == ["我", "爱", "北", "京", "天", "安", "门", "hello", "world", "2024"]


def test_char_tokenizer_full_width_is_nfkc_normalised():
    assert CharTokenizer().tokenize("ＡＢＣ１２") == ["abc12"]


def test_char_tokenizer_cjk_punctuation_splits_latin_runs():
    # 、“”？ separate tokens and are dropped; a CJK character ends a Latin run.
    assert CharTokenizer().tokenize("“GPT”、模型？abc中def") == ["gpt", "模", "型", "abc", "中", "def"]


def test_identical_chinese_scores_one():
    text = "今天北京天气不错，适合出门散步。"
    assert pair_f1(text, text) == {name: pytest.approx(1.0) for name in ROUGE_TYPES}


def test_disjoint_chinese_scores_zero():
    assert pair_f1("北京天气很好", "上海下雨了") == {name: 0.0 for name in ROUGE_TYPES}


def test_known_chinese_pair_matches_hand_computation():
    # prediction 北京天气很好 -> 北 京 天 气 很 好 (6 tokens)
    # reference 今天北京天气不错 -> 今 天 北 京 天 气 不 错 (8 tokens)
    # rouge1: clipped unigram overlap 北 京 天 气 = 4 (天 is twice in the reference, once in the prediction)
    #         P = 4/6, R = 4/8, F1 = 2*(2/3)*(1/2) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7
    # rouge2: prediction bigrams 北京 京天 天气 气很 很好 (5); reference 今天 天北 北京 京天 天气 气不 不错 (7)
    #         overlap 北京 京天 天气 = 3, P = 3/5, R = 3/7, F1 = 2*(9/35) / (36/35) = 1/2
    # rougeL: LCS 北京天气 = 4, P = 4/6, R = 4/8, F1 = 4/7
    got = pair_f1("北京天气很好", "今天北京天气不错")
    assert f1(4, 6, 8) == pytest.approx(4 / 7) and f1(3, 5, 7) == pytest.approx(1 / 2)
    assert got == {"rouge1": pytest.approx(4 / 7), "rouge2": pytest.approx(1 / 2), "rougeL": pytest.approx(4 / 7)}


def test_default_rouge_score_tokenizer_scores_chinese_zero_but_char_scores_one():
    # The pitfall this module exists for: rouge_score keeps only [a-z0-9], so Chinese has no tokens at all.
    text = "北京天气很好"
    default = rouge_scorer.RougeScorer(list(ROUGE_TYPES)).score(target=text, prediction=text)
    assert {name: default[name].fmeasure for name in ROUGE_TYPES} == {name: 0.0 for name in ROUGE_TYPES}
    assert rouge_tokenizer("word").tokenize(text) == []
    assert pair_f1(text, text, "char") == {name: pytest.approx(1.0) for name in ROUGE_TYPES}
    assert pair_f1(text, text, "word") == {name: 0.0 for name in ROUGE_TYPES}


def test_word_segmentation_english_matches_hand_computation():
    # prediction: the cat sat on the mat (6); reference: the cat is on the mat (6)
    # rouge1: overlap the×2 cat on mat = 5, P = R = 5/6, F1 = 5/6
    # rouge2: prediction "the cat" "cat sat" "sat on" "on the" "the mat"; reference "the cat" "cat is" "is on"
    #         "on the" "the mat"; overlap "the cat" "on the" "the mat" = 3, P = R = 3/5, F1 = 3/5
    # rougeL: LCS the cat on the mat = 5, F1 = 5/6
    got = pair_f1("The cat sat on the mat.", "the cat is on the mat", segmentation="word")
    assert got == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}


def test_char_segmentation_keeps_english_word_level():
    # Same pair as above under "char": English words are still one token each, so the scores are the same.
    got = pair_f1("The cat sat on the mat.", "the cat is on the mat", segmentation="char")
    assert got == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}


def test_pair_without_tokens_scores_zero():
    assert pair_f1("", "北京天气很好") == {name: 0.0 for name in ROUGE_TYPES}
    assert pair_f1("北京天气很好", "。！？ ") == {name: 0.0 for name in ROUGE_TYPES}


def test_single_token_pair_has_no_bigrams():
    # one identical token: unigram and LCS match fully, but there are no bigrams on either side, so rouge2 is 0
    assert pair_f1("好", "好") == {"rouge1": pytest.approx(1.0), "rouge2": 0.0, "rougeL": pytest.approx(1.0)}


def test_rouge_scores_is_mean_of_pair_f1():
    predictions = ["北京天气很好", "我爱北京天安门"]
    references = ["今天北京天气不错", "我爱天安门"]
    pairs = [pair_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    got = rouge_scores(predictions, references)
    assert got["n"] == 2 and got["segmentation"] == "char"
    for name in ROUGE_TYPES:
        assert got[name] == pytest.approx((pairs[0][name] + pairs[1][name]) / 2)
    # the two pairs differ, so a mean that used only one of them would fail
    assert pairs[0] != pairs[1]
    # pair 1 by hand: 我爱北京天安门 (7) vs 我爱天安门 (5): unigram overlap 5, LCS 我爱天安门 = 5,
    # bigrams 我爱 爱北 北京 京天 天安 安门 (6) vs 我爱 爱天 天安 安门 (4): overlap 3
    assert got["rouge1"] == pytest.approx((4 / 7 + f1(5, 7, 5)) / 2)
    assert got["rouge2"] == pytest.approx((1 / 2 + f1(3, 6, 4)) / 2)
    assert got["rougeL"] == pytest.approx((4 / 7 + f1(5, 7, 5)) / 2)


def test_rouge_scores_word_segmentation_is_recorded():
    got = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"], segmentation="word")
    assert got == {
        "rouge1": pytest.approx(5 / 6),
        "rouge2": pytest.approx(3 / 5),
        "rougeL": pytest.approx(5 / 6),
        "n": 1,
        "segmentation": "word",
    }


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no prediction/reference pairs"):
        rouge_scores([], [])


@pytest.mark.parametrize(
    "call",
    [
        lambda: rouge_tokenizer("jieba"),
        lambda: pair_f1("a", "a", "jieba"),
        lambda: rouge_scores(["a"], ["a"], segmentation="jieba"),
    ],
)
def test_unknown_segmentation_raises_naming_options(call):
    with pytest.raises(ValueError, match="'char'") as err:
        call()
    assert "'word'" in str(err.value) and "jieba" in str(err.value)


def test_segmentations_constant():
    assert SEGMENTATIONS == ("char", "word")
    for segmentation in SEGMENTATIONS:
        assert hasattr(rouge_tokenizer(segmentation), "tokenize")
