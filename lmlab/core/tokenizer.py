"""Tokenizer: load any Hugging Face tokenizer folder, or train a BPE (char or byte level) on the run's data.

Memory. tokenizers' ``BpeTrainer`` keeps one entry per *unique* pre-tokenized piece, one 32-byte symbol per
character (char level) or byte (byte level) of it, and an index from every symbol pair to the pieces that hold it,
so its memory grows with the amount of unique text it is given. Chinese has no spaces, so under GPT-2's ByteLevel
regex a whole clause, or a whole line without punctuation, is one piece. Here pieces are cut at punctuation, at
every digit, at whitespace, and capped at ``max_piece_chars`` characters, so no line, however long, makes a large
piece; real Chinese clauses are still mostly unique, so the table still grows with the text, and ``max_bytes`` is
what bounds it: it trains on an even sample of documents of about that size (SentencePiece's
``input_sentence_size`` idea). benchmarks/tokenizer_train.py measures both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

log = logging.getLogger(__name__)

LEVELS = ("char", "byte")
# Layout characters a char-level vocabulary always holds. Pretraining corpora hold one document per line, so a
# trained alphabet would never see them, and every line break of a chat layout or an answer would become unk.
LAYOUT_CHARS = ["\n", "\t", "\r"]
# Every other whitespace character (no-break and ideographic spaces, \v, \f, U+2028, ...) means a space to a
# char-level tokenizer: it becomes " " (then Metaspace's "▁") instead of unk. NFKC alone misses some of them.
OTHER_WHITESPACE = Regex(r"[^\S\n\t\r ]")
# A folder AutoTokenizer can load holds one of these (a fast tokenizer's file, its config, or a slow one's vocabulary).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
)
# A Hugging Face Hub repo id: a name, or namespace/name (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


# What tokenizers' Punctuation pre-tokenizer isolates, as a regex class: Unicode punctuation (P*) and every ASCII
# punctuation mark (some of which, like $ + < = > ^ ` | ~, are symbols to Unicode).
PUNCTUATION = r"\p{P}$+<=>^`|~"


def byte_pieces_regex(split_punctuation: bool, split_digits: bool, max_piece_chars: int | None) -> str:
    """The byte level's pieces as one regex: GPT-2's (a space stays with the run after it, runs of letters, digits
    or other symbols, whitespace), with punctuation marks and digits as pieces of their own and every run cut at
    ``max_piece_chars``.

    One regex instead of a sequence of pre-tokenizers (punctuation, digits, cut runs, GPT-2's regex) because
    tokenizers then cuts text faster (benchmarks/tokenizer_engines.py: 1.2-1.4x on Chinese, one core), and an engine
    that takes one regex, like tiktoken, can give the same tokens (it did on all 19,355 Chinese documents measured, at
    3-5x tokenizers' speed). The pieces are the sequence's except where a run of non-space characters that mixes
    categories (letters and symbols; also punctuation without ``split_punctuation``, digits without
    ``split_digits``) is longer than ``max_piece_chars``: the sequence cut the run, this cuts each category's run at
    the cap (with conf/bpe/byte.yaml's settings, 14 of 19,355 Chinese documents tokenize otherwise).
    """
    run = f"{{1,{max_piece_chars}}}" if max_piece_chars else "+"
    punctuation = PUNCTUATION if split_punctuation else ""
    parts = [f"[{punctuation}]"] if split_punctuation else ["'s|'t|'re|'ve|'m|'ll|'d"]  # GPT-2's contractions
    parts.append(r"\p{N}" if split_digits else rf" ?\p{{N}}{run}")
    parts += [rf" ?\p{{L}}{run}", rf" ?[^\s\p{{L}}\p{{N}}{punctuation}]{run}", r"\s+(?!\S)", r"\s+"]
    return "|".join(parts)


def build_pre_tokenizer(
    level: str, split_punctuation: bool, split_digits: bool, split_whitespace: bool, max_piece_chars: int | None
) -> pre_tokenizers.PreTokenizer:
    """The pieces BPE may merge within (never across).

    Char level starts with Metaspace (spaces become "▁" and start a piece, as in SentencePiece) and, with
    ``split_whitespace``, makes runs of line breaks and tabs pieces of their own (as GPT-2's regex does at byte
    level), so no token crosses a line: a chat header like "\n助手" or a reply after "<|assistant|>\n" is cut
    the same way wherever it stands. Byte level ends with ByteLevel (bytes become printable characters); with
    ``split_whitespace`` its pieces are one regex (:func:`byte_pieces_regex`: GPT-2's, spaces kept as "Ġ"). In
    between: punctuation and digits as pieces of their own, then runs of non-space characters cut to
    ``max_piece_chars`` (a space before a run stays with it, so byte level keeps "Ġword").
    """
    if level == "byte" and split_whitespace:
        pieces = byte_pieces_regex(split_punctuation, split_digits, max_piece_chars)
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pieces), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    steps: list[pre_tokenizers.PreTokenizer] = []
    if level == "char":
        steps.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split_whitespace))
        if split_whitespace:
            steps.append(pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"))
    if split_punctuation:
        steps.append(pre_tokenizers.Punctuation(behavior="isolated"))
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if max_piece_chars:
        steps.append(pre_tokenizers.Split(Regex(rf"\s*\S{{1,{max_piece_chars}}}"), behavior="isolated"))
    if level == "byte":
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


class CorpusStream:
    """The documents the trainer reads, streamed: a held-out sample is set aside, the rest thinned to a byte budget.

    Every ``heldout_every``-th document goes to ``heldout`` (until it holds ``heldout_bytes``), for the report.
    With ``max_bytes``, a document is kept only while the bytes kept so far are below ``max_bytes / total_bytes``
    of the bytes seen, which spreads the sample evenly over the whole corpus (whole documents, no randomness);
    the stream stops once ``max_bytes`` are kept. Skipped documents are still read past (the datamodule has no
    seek), but never reach the trainer.
    """

    def __init__(
        self,
        texts: Iterable[str],
        max_bytes: int | None,
        total_bytes: int | None,
        heldout_every: int,
        heldout_bytes: int,
    ):
        if max_bytes is not None and not total_bytes:
            raise ValueError(
                "bpe.max_bytes samples evenly over the corpus, so it needs total_bytes (its size in bytes)"
            )
        self.texts = texts
        self.max_bytes = max_bytes
        self.rate = 1.0 if max_bytes is None else min(1.0, max_bytes / total_bytes)
        self.heldout_every = heldout_every
        self.heldout_bytes = heldout_bytes
        self.heldout: list[str] = []
        self.heldout_size = 0
        self.seen_bytes = 0
        self.train_bytes = 0
        self.train_docs = 0

    def __iter__(self) -> Iterator[str]:
        for i, doc in enumerate(self.texts):
            size = len(doc.encode("utf-8"))
            if i % self.heldout_every == self.heldout_every - 1 and self.heldout_size < self.heldout_bytes:
                self.heldout.append(doc)
                self.heldout_size += size
                continue
            self.seen_bytes += size
            if self.train_bytes >= self.rate * self.seen_bytes:
                continue
            self.train_bytes += size
            self.train_docs += 1
            yield doc
            if self.max_bytes is not None and self.train_bytes >= self.max_bytes:
                return


def corpus_bytes(files: Sequence[str | Path]) -> int:
    """Size of the corpus on disk, the ``total_bytes`` that ``bpe.max_bytes`` samples from (about its text size)."""
    return sum(os.path.getsize(f) for f in files)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def heldout_report(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> dict[str, Any]:
    """Characters per token and the share of unknown tokens on documents the trainer never saw."""
    ids = [i for row in tokenizer(docs, add_special_tokens=False)["input_ids"] for i in row] if docs else []
    chars = sum(len(d) for d in docs)
    unk = tokenizer.unk_token_id
    return {
        "heldout_docs": len(docs),
        "heldout_chars": chars,
        "heldout_tokens": len(ids),
        "chars_per_token": round(chars / len(ids), 4) if ids else None,
        "unk_share": (sum(i == unk for i in ids) / len(ids) if unk is not None else 0.0) if ids else None,
    }


def train_bpe_with_report(
    texts: Iterable[str],
    level: str,
    vocab_size: int,
    min_frequency: int,
    alphabet_share: float | None,
    nfkc: bool,
    split_punctuation: bool,
    split_digits: bool,
    split_whitespace: bool,
    max_piece_chars: int | None,
    max_bytes: int | None,
    heldout_every: int,
    heldout_bytes: int,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    unk_token: str | None,
    extra_special_tokens: list[str],
    sentinel_tokens: int = 0,
    chat_template: str | None = None,
    total_bytes: int | None = None,
) -> tuple[PreTrainedTokenizerFast, dict[str, Any]]:
    """A BPE trained on ``texts`` (settings: conf/bpe/*.yaml) and its report (vocab, held-out stats, time, memory).

    Special tokens are added whole (never split, one id each, also inside text). ``alphabet_share`` caps the
    single characters at that share of ``vocab_size`` (the rest become ``unk_token``): Chinese text has thousands
    of distinct characters, which would otherwise fill the whole vocabulary before any merge.
    ``sentinel_tokens`` adds T5's ``<extra_id_0>``, ``<extra_id_1>``, ... for span corruption.
    A char-level alphabet always holds ``LAYOUT_CHARS`` (line break, tab, carriage return), whatever the text;
    other whitespace becomes a space (``OTHER_WHITESPACE``).
    """
    if level not in LEVELS:
        raise ValueError(f"bpe.level={level!r}: choose one of {LEVELS}")
    if level == "char" and unk_token is None:
        raise ValueError("bpe.level=char needs bpe.unk_token for characters outside its alphabet")
    extra = list(extra_special_tokens) + [f"<extra_id_{i}>" for i in range(sentinel_tokens)]
    specials = list(dict.fromkeys(t for t in [bos_token, eos_token, pad_token, unk_token, *extra] if t))
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    normalize = [normalizers.NFKC()] if nfkc else []
    if level == "char":
        normalize.append(normalizers.Replace(OTHER_WHITESPACE, " "))
    tok.normalizer = normalizers.Sequence(normalize) if normalize else None
    tok.pre_tokenizer = build_pre_tokenizer(level, split_punctuation, split_digits, split_whitespace, max_piece_chars)
    tok.decoder = decoders.ByteLevel() if level == "byte" else decoders.Metaspace("▁", prepend_scheme="first")
    limit = {} if alphabet_share is None else {"limit_alphabet": int(alphabet_share * vocab_size)}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if level == "byte" else LAYOUT_CHARS,
        show_progress=False,
        **limit,
    )
    stream = CorpusStream(texts, max_bytes, total_bytes, heldout_every, heldout_bytes)
    start = time.perf_counter()
    tok.train_from_iterator(stream, trainer)
    seconds = time.perf_counter() - start
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        additional_special_tokens=extra,
    )
    fast.chat_template = chat_template
    report = {
        "level": level,
        "vocab_size": len(fast),
        "train_docs": stream.train_docs,
        "train_bytes": stream.train_bytes,
        "seen_bytes": stream.seen_bytes,
        "max_bytes": max_bytes,
        **heldout_report(fast, stream.heldout),
        "train_seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    log.info("trained %s-level BPE: %s", level, report)
    return fast, report


def train_bpe(
    texts: Iterable[str], chat_template: str | None = None, total_bytes: int | None = None, **settings: Any
) -> PreTrainedTokenizerFast:
    """:func:`train_bpe_with_report` for callers that only need the tokenizer (the report is logged)."""
    return train_bpe_with_report(texts, chat_template=chat_template, total_bytes=total_bytes, **settings)[0]


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: str | Path) -> Path:
    """save_pretrained with the chat template inside tokenizer_config.json (one file to carry)."""
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    return Path(out)


def train_and_save(
    datamodule: Any, out: str | Path, chat_template: str | None, settings: dict[str, Any]
) -> tuple[PreTrainedTokenizerFast, dict[str, Any]]:
    """Train on a datamodule's training text (sized for ``max_bytes`` by its files); save it with report.json."""
    tokenizer, report = train_bpe_with_report(
        datamodule.iter_texts(),
        chat_template=chat_template,
        total_bytes=corpus_bytes(datamodule.train_files),
        **settings,
    )
    out = save_tokenizer(tokenizer, out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return tokenizer, report


def _check_local_tokenizer(path: str | Path) -> None:
    """Say what is wrong with a local tokenizer path in its own words, before transformers answers a missing path
    with a Hub repo id rule and a folder without a tokenizer with "install sentencepiece or tiktoken".

    A name that is no local path but could be a Hub repo id (``gpt2``, ``org/name``) is left to transformers.
    """
    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(f"tokenizer={path} is a file; give the folder that holds it ({local.parent})")
    if local.is_dir():
        if not any((local / name).is_file() for name in TOKENIZER_FILES):
            inside = next((d for d in (local / "hf", local / "tokenizer") if (d / "tokenizer.json").is_file()), None)
            hint = f"; the run's tokenizer is in {inside}" if inside else ""
            raise ValueError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer_config.json){hint}")
    elif not HUB_ID.fullmatch(str(path)):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any tokenizer folder ``AutoTokenizer`` reads, or a Hub repo id; a pad token is required for batching."""
    _check_local_tokenizer(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except OSError as e:
        if Path(path).expanduser().exists():
            raise
        raise OSError(
            f"tokenizer={path}: no local folder of that name, and loading it from the Hugging Face Hub failed ({e})"
        ) from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has neither a pad nor an eos token; add a pad token to it")
        tok.pad_token = tok.eos_token
        log.warning("tokenizer %s has no pad token; using eos %r for padding", path, tok.eos_token)
    return tok


def configure_tokenizer(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None, max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """Set what a run decides about its tokenizer, once, before anything reads it (train.py, the inference loader).

    ``chat_template`` replaces the tokenizer's own when given (None keeps it); ``max_length`` is a classifier's
    truncation length, saved with the export so ``tokenizer(text, truncation=True)`` cuts as in training.
    Datamodules, tasks and the chat only read the tokenizer afterwards.
    """
    if chat_template:
        tokenizer.chat_template = chat_template
    if max_length is not None:
        tokenizer.model_max_length = max_length
    return tokenizer


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None = None) -> str:
    """``messages`` rendered as a prompt, with the next reply's header: what generation continues and what the SFT
    labels start after. ``chat_template``: a data preset's own (None: the tokenizer's)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def encoder_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None) -> torch.Tensor:
    """An encoder input: the text's tokens cut to ``max_length - 1``, then EOS (T5's convention).

    Training (datamodules/sft.py) and generation (lmlab.infer.generation) both encode prompts through this, so
    they see the same input.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if max_length is not None:
        ids = ids[: max_length - 1]
    return torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.long)


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Say how to choose a template where one is needed and the tokenizer has none."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template: choose one with template=chatml|alpaca|babyllama")


def trained_max_length(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The truncation length a classifier run saved with its tokenizer (:func:`configure_tokenizer`), or None where
    none was saved (transformers then reports its VERY_LARGE_INTEGER placeholder)."""
    return None if tokenizer.model_max_length >= VERY_LARGE_INTEGER else int(tokenizer.model_max_length)
