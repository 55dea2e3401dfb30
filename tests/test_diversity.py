"""distinct-n and the repetition-loop detector on replies written by hand."""

from __future__ import annotations

import pytest

from lmlab.eval.diversity import distinct_n, in_repetition_loop


def test_distinct_2_counts_unique_character_bigrams():
    assert distinct_n(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n(["北京是首都", "上海很大"], 2) == 1.0
    assert distinct_n(["", "a"], 2) is None


@pytest.mark.parametrize(
    "text",
    [
        "我是一个学生。我是一个学生。我是一个学生。",
        "苹果，香蕉，苹果，香蕉，苹果，香蕉，",
        "好的！！！！！！",
        "北京 北京 北京 北京",
    ],
)
def test_loops_are_caught(text):
    assert in_repetition_loop(text)


@pytest.mark.parametrize(
    "text",
    [
        "中国的首都是北京。北京是一座历史悠久的城市，有故宫和长城。",
        "哈哈哈，谢谢你！",
        "1. 苹果\n2. 香蕉\n3. 橙子",
        "",
    ],
)
def test_ordinary_replies_are_not_loops(text):
    assert not in_repetition_loop(text)
