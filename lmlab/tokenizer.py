"""Tokenizer: load any Hugging Face tokenizer folder, or train a byte-level BPE on the run's data."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)


def train_bpe(
    texts: Iterable[str],
    level: str,
    vocab_size: int,
    min_frequency: int,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    extra_special_tokens: list[str],
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (never an unknown token) trained on ``texts``, with the special tokens added whole."""
    if level != "byte":
        raise NotImplementedError(f"bpe.level={level!r}: only 'byte' is implemented so far")
    specials = [bos_token, eos_token, pad_token, *extra_special_tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=list(extra_special_tokens),
    )
    fast.chat_template = chat_template
    log.info("trained byte-level BPE: %d tokens", len(fast))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any tokenizer folder ``AutoTokenizer`` reads; a pad token is required for batching."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has neither a pad nor an eos token; add a pad token to it")
        tok.pad_token = tok.eos_token
        log.warning("tokenizer %s has no pad token; using eos %r for padding", path, tok.eos_token)
    return tok
