"""How varied generated replies are: distinct-n and repetition loops, on characters (Chinese has no spaces).

A small model's typical failure is a reply that repeats one phrase until max_new_tokens; these two numbers
catch it without a judge model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A unit of 2-40 characters repeated back to back at least 3 times ("我是学生。我是学生。我是学生。"), or one
# character 6 times ("！！！！！！"); "哈哈哈" or "谢谢" are ordinary text.
LOOP = re.compile(r"(.{2,40}?)\1{2,}|(.)\2{5,}", re.DOTALL)


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct character n-grams over all n-grams of all ``texts`` (Li et al., 2016, on characters)."""
    grams = [text[i : i + n] for text in texts for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def in_repetition_loop(text: str) -> bool:
    """Whether ``text`` repeats a unit back to back (see :data:`LOOP`), whitespace ignored."""
    return LOOP.search(re.sub(r"\s+", "", text)) is not None
