"""Batched generation from rendered prompts, for causal and encoder-decoder models alike.

Used by the samples logged at validation and by generate.py, so both see what a transformers
user of the export sees: the same prompt encoding as training (causal: the rendered prompt's
tokens; encoder-decoder: them plus EOS, see datamodules.sft.encoder_ids) and generate().
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.collate import pad
from datamodules.sft import encoder_ids

SAMPLING_KNOBS = ("temperature", "top_p", "top_k")


def generate_kwargs(settings: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """generate() arguments from conf/generation; sampling knobs only when sampling (else transformers warns)."""
    kwargs = {k: v for k, v in settings.items() if k not in SAMPLING_KNOBS or settings["do_sample"]}
    return {**kwargs, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def encode_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """A padded batch: encoder inputs padded on the right, causal prompts on the left (so replies follow them)."""
    if model.config.is_encoder_decoder:
        rows = [encoder_ids(tokenizer, p) for p in prompts]
        width = max(len(r) for r in rows)
        return {"input_ids": pad(rows, tokenizer.pad_token_id, width),
                "attention_mask": pad([torch.ones(len(r), dtype=torch.long) for r in rows], 0, width)}
    return tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def decode_reply(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The reply's text up to its first EOS (in a batch, shorter replies are padded after it)."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   settings: Mapping[str, Any], batch_size: int = 8) -> list[str]:
    """Replies to already rendered prompts, ``batch_size`` at a time, with conf/generation ``settings``."""
    replies: list[str] = []
    kwargs = generate_kwargs(settings, tokenizer)
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(model.device) for k, v in encode_prompts(model, tokenizer, prompts[start:start + batch_size]).items()}
        out = model.generate(**batch, **kwargs)
        if not model.config.is_encoder_decoder:  # a causal model's output starts with its prompt
            out = out[:, batch["input_ids"].shape[1]:]
        replies += [decode_reply(tokenizer, row) for row in out.tolist()]
    return replies
