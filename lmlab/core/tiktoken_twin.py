"""tiktoken as a second engine for a byte-level BPE tokenizer: the same token ids, several times faster per core.

Preparing pretraining data spends its time in BPE (datamodules/shards.py). tiktoken runs the same kind of BPE, with
the tokenizer's own pre-tokenizer regex and merges, at about 3x the speed of Hugging Face tokenizers on one core
(benchmarks/results/2026-12-02_cpu_tokenization_tiktoken.md). :class:`TiktokenTwin` builds it only where the ids are
the same by construction, and otherwise says why not (:class:`NoTwin`):

- Both engines cut the text into pieces with the same regex, one of lmlab's byte-level regexes
  (lmlab.core.tokenizer.byte_pieces_regex: every character falls in a piece, and both regex engines read it alike;
  another pattern is refused, as Oniguruma and tiktoken's engine differ in syntax such as ``$``), followed by
  ``ByteLevel`` without a regex of its own, and start from single bytes.
- tokenizers merges the adjacent pair of lowest merge rank; tiktoken the adjacent pair whose joined bytes have the
  lowest rank, and takes a whole piece at once when it is a token; both take the leftmost pair on ties. With each
  merge's result ranked by the merge's position (single bytes first), the two pick the same pair whenever the pair
  is a merge. They could differ only by tiktoken joining two tokens that are not a merge pair although their bytes
  form a token ``t``. That cannot happen when every merged token's own bytes encode to that token alone (checked for
  the whole vocabulary here): two such tokens side by side, exactly covering ``t``'s bytes, would have come from
  merges inside ``t``'s bytes alone, in the order tokenizers' BPE applies them to ``t`` by itself, which ends at
  ``t``, never at another split of it. The same check covers tiktoken's whole-piece shortcut.
- Text that tokenizers handles outside BPE goes to tokenizers: a document holding an added token's text
  (``<|endoftext|>``), and one holding a character unassigned in Python's Unicode tables (the two regex engines may
  have other Unicode versions; for assigned characters tests/test_tiktoken_twin.py compares every code point but
  private use, in context, through a BPE where another cut gives other ids).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Sequence
from functools import cache
from itertools import chain

import numpy as np
import tiktoken
from tokenizers import Tokenizer, models

BYTE_LEVEL = {  # the pre-tokenizer after the regex: bytes to printable stand-ins, no regex or prefix of its own
    "type": "ByteLevel",
    "add_prefix_space": False,
    "use_regex": False,
}


class NoTwin(ValueError):
    """The tokenizer has no exact tiktoken twin; the message says why."""


def _byte_chars() -> dict[str, int]:
    """ByteLevel's printable stand-in characters and their bytes (GPT-2's table, as transformers keeps it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _regex(spec: dict) -> str:
    """The pattern of a ``Split(regex, isolated)`` + ``ByteLevel`` pre-tokenizer with no normalizer, where the regex
    is one of lmlab's byte-level ones (module docstring), else NoTwin."""
    from lmlab.core.tokenizer import byte_pieces_regex  # here: a worker process unpickling a twin needs none of it

    if spec.get("normalizer") is not None:
        raise NoTwin(f"it has a normalizer ({spec['normalizer'].get('type')})")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = steps[0] if len(steps) == 2 else {}
    byte_level = {key: steps[-1].get(key) for key in BYTE_LEVEL} if steps else {}
    pattern = split.get("pattern", {}).get("Regex")
    is_split = split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
    if not is_split or pattern is None or byte_level != BYTE_LEVEL:
        raise NoTwin("its pre-tokenizer is not one regex (Split, isolated) followed by ByteLevel without a regex")
    cap = re.search(r"\{1,(\d+)\}", pattern)  # max_piece_chars, where the regex cuts runs
    lmlab_regexes = {
        byte_pieces_regex(punctuation, digits, int(cap.group(1)) if cap else None)
        for punctuation in (True, False)
        for digits in (True, False)
    }
    if pattern not in lmlab_regexes:
        raise NoTwin(f"its pre-tokenizer regex {pattern!r} is not one of lmlab's byte-level regexes")
    return pattern


def bpe_merges(model: dict) -> list[tuple[str, str]]:
    """A tokenizer.json model's merges (written "a b" or ["a", "b"]) for a plain byte-level BPE (no dropout,
    affixes, byte fallback or whole-word lookup), else NoTwin."""
    if model.get("type") != "BPE":
        raise NoTwin(f"its model is {model.get('type')}, not BPE")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(option):
            raise NoTwin(f"its BPE sets {option}={model[option]!r}")
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


@cache
def _unassigned() -> np.ndarray:
    """Per code point: unassigned in Python's Unicode tables (or a surrogate)."""
    return np.array([unicodedata.category(chr(code)) in ("Cn", "Cs") for code in range(sys.maxunicode + 1)])


class TiktokenTwin:
    """``encode_batch`` gives a byte-level BPE tokenizer's ids (``add_special_tokens=False``) through tiktoken where
    that is exact (module docstring), and through the tokenizer elsewhere; one thread either way. Raises
    :class:`NoTwin` for a tokenizer it cannot twin."""

    def __init__(self, tokenizer: Tokenizer):
        spec = json.loads(tokenizer.to_str())
        pattern = _regex(spec)
        merges = bpe_merges(spec["model"])
        vocab: dict[str, int] = spec["model"]["vocab"]
        chars = _byte_chars()
        missing = [char for char in chars if char not in vocab]
        if missing:
            raise NoTwin(f"{len(missing)} of the 256 bytes are not in its vocabulary")
        merged = [left + right for left, right in merges]
        if len(set(merged)) != len(merged) or not all(token in vocab for token in merged):
            raise NoTwin("its merges do not each make a token of their own")
        plain = Tokenizer(models.BPE(vocab=vocab, merges=merges))  # the merges alone: no regex, cache or shortcut
        wrong = [token for token in merged if plain.encode(token, add_special_tokens=False).ids != [vocab[token]]]
        if wrong:
            raise NoTwin(f"{len(wrong)} merged tokens do not encode to themselves, e.g. {wrong[0]!r}")

        def to_bytes(token: str) -> bytes:
            return bytes(chars[c] for c in token)

        ranks = {bytes([byte]): byte for byte in range(256)}
        ranks.update({to_bytes(token): 256 + i for i, token in enumerate(merged)})
        ids = [vocab[char] for char in sorted(chars, key=chars.get)] + [vocab[token] for token in merged]
        self.ids = np.array(ids, dtype=np.uint32)  # a rank's id in the tokenizer
        self.encoding = tiktoken.Encoding("lmlab-twin", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.tokenizer = tokenizer
        added = [re.escape(t["content"]) for t in spec.get("added_tokens", []) if t["content"]]
        self.added = re.compile("|".join(added)) if added else None
        self.unassigned = _unassigned()

    def for_tokenizer(self, text: str) -> bool:
        """Whether ``text`` goes to the tokenizer: it holds an added token's text or an unassigned character."""
        if self.added is not None and self.added.search(text):
            return True
        return bool(self.unassigned[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)].any())

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's token ids, as the tokenizer's ``encode_batch_fast(texts, add_special_tokens=False)`` gives.

        One check of the whole batch clears the usual batch, with nothing for the tokenizer; only a batch it flags is
        checked text by text (an added token's text across two texts flags a batch, and no text of it). tiktoken's
        ranks are mapped to ids in one go."""
        if not texts:
            return []
        flagged = self.for_tokenizer("".join(texts))
        hard = [i for i, text in enumerate(texts) if self.for_tokenizer(text)] if flagged else []
        skip = set(hard)
        ranks = [[] if i in skip else self.encoding.encode_ordinary(text) for i, text in enumerate(texts)]
        lengths = [len(r) for r in ranks]
        ids = self.ids[np.fromiter(chain.from_iterable(ranks), dtype=np.int64, count=sum(lengths))]
        out = np.split(ids, np.cumsum(lengths[:-1]))
        encoded = self.tokenizer.encode_batch_fast([texts[i] for i in hard], add_special_tokens=False) if hard else []
        for i, encoding in zip(hard, encoded, strict=True):
            out[i] = np.asarray(encoding.ids, dtype=np.uint32)
        return out
