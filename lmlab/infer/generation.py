"""Batched generation from rendered prompts, for causal and encoder-decoder models alike.

Used by the samples logged at validation and by generate.py, so both see what a transformers
user of the export sees: the same prompt encoding as training (causal: the rendered prompt's
tokens; encoder-decoder: them plus EOS, see lmlab.core.tokenizer.encoder_ids) and generate().
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.generation.streamers import BaseStreamer

from lmlab.core.collate import pad, padding_mask
from lmlab.core.models import auto_class, is_classifier, is_vision_language, resolve_hf_dir
from lmlab.core.tokenizer import configure_tokenizer, encoder_ids, load_tokenizer
from lmlab.core.vision import load_processor, open_image, pixel_values

SAMPLING_KNOBS = ("temperature", "top_p", "top_k")


class ReplyOnly(LogitsProcessor):
    """Runs ``processor`` on the generated tokens only, not on the prompt before them.

    transformers' repetition penalty and n-gram ban look at all of a causal model's ``input_ids``, prompt included:
    with ``no_repeat_ngram_size: 3`` a summary could not copy any 3 tokens of its source text, and a repetition
    penalty pushed a chat answer away from the question's words. conf/generation means repeats of the reply itself.
    """

    def __init__(self, processor: LogitsProcessor, prompt_length: int):
        self.processor = processor
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processor(input_ids[:, self.prompt_length :], scores)


def reply_only_processors(settings: Mapping[str, Any], prompt_length: int) -> LogitsProcessorList:
    """conf/generation's repetition knobs for a causal model, blind to its ``prompt_length`` prompt tokens.

    A knob missing from ``settings`` is off, as it is for generate().
    """
    processors = []
    if settings.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(settings["repetition_penalty"])))
    if settings.get("no_repeat_ngram_size", 0) > 0:
        processors.append(NoRepeatNGramLogitsProcessor(int(settings["no_repeat_ngram_size"])))
    return LogitsProcessorList(ReplyOnly(p, prompt_length) for p in processors)


def generate_kwargs(
    settings: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, prompt_length: int | None = None
) -> dict[str, Any]:
    """generate() arguments from conf/generation; sampling knobs only when sampling (else transformers warns).

    ``prompt_length``: the causal prompt width, whose tokens the repetition knobs then ignore (:class:`ReplyOnly`;
    transformers runs custom processors before temperature, top-k and top-p, where it runs its own). An
    encoder-decoder's decoder holds only the reply, so it leaves the knobs to transformers (``None``).
    """
    kwargs = {k: v for k, v in settings.items() if k not in SAMPLING_KNOBS or settings["do_sample"]}
    if prompt_length is not None:
        kwargs["logits_processor"] = reply_only_processors(settings, prompt_length)
        kwargs |= {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    return {**kwargs, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def encode_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """A padded batch: encoder inputs padded on the right, causal prompts on the left (so replies follow them).

    Causal prompts are the rendered text's tokens alone (no special tokens added): the same batch as
    ``tokenizer(prompts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")``.
    """
    if model.config.is_encoder_decoder:
        rows, side = [encoder_ids(tokenizer, p) for p in prompts], "right"
    else:
        rows, side = tokenizer(list(prompts), add_special_tokens=False)["input_ids"], "left"
    width = max(len(r) for r in rows)
    return {
        "input_ids": pad(rows, tokenizer.pad_token_id, width, side),
        "attention_mask": padding_mask(rows, width, side),
    }


def decode_reply(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """The reply's text up to its first EOS (in a batch, shorter replies are padded after it)."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: Mapping[str, Any],
    batch_size: int = 8,
    streamer: BaseStreamer | None = None,
    generate_args: Mapping[str, Any] | None = None,
    images: torch.Tensor | None = None,
) -> list[str]:
    """Replies to already rendered prompts, ``batch_size`` at a time, with conf/generation ``settings``.

    ``streamer`` (transformers' TextStreamer and kin; one prompt only) receives the tokens as they are made (chat.py).
    ``generate_args``: more generate() arguments that are no conf/generation knob, such as ``stopping_criteria``
    (serve.py's stop strings); the same objects are passed to every batch. An argument that ``settings`` or this
    function already sets is refused rather than silently replaced. ``images``: a vision-language model's
    pixel_values, one image per prompt (each prompt holds its image's placeholder tokens, lmlab.core.vision).
    """
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: one image per prompt")
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer follows one reply; got {len(prompts)} prompts")
    generate_args = generate_args or {}
    replies: list[str] = []
    causal = not model.config.is_encoder_decoder
    for start in range(0, len(prompts), batch_size):
        batch = {
            k: v.to(model.device)
            for k, v in encode_prompts(model, tokenizer, prompts[start : start + batch_size]).items()
        }
        if images is not None:
            batch["pixel_values"] = images[start : start + batch_size].to(model.device, model.dtype)
        width = batch["input_ids"].shape[1]
        kwargs = {**batch, **generate_kwargs(settings, tokenizer, width if causal else None)}
        if streamer is not None:
            kwargs["streamer"] = streamer
        if clash := sorted(kwargs.keys() & generate_args.keys()):
            raise ValueError(f"generate_args {clash} are set from settings or by generate_texts itself")
        out = model.generate(**kwargs, **generate_args)
        if causal:  # a causal model's output starts with its prompt
            out = out[:, width:]
        replies += [decode_reply(tokenizer, row) for row in out.tolist()]
    return replies


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU (half precision is slow there)."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose auto or one of {list(DTYPES)}")
    return DTYPES[dtype]


def load_for_inference(
    path: str | Path, device: str = "auto", dtype: str = "auto", chat_template: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A run's (or HF folder's) model in eval mode on ``device`` (auto: cuda if any) in ``dtype``, and its tokenizer,
    with ``chat_template`` (conf/template; None: the one saved with the run) set once, here.

    The one loader of ``run=``/``device=``/``dtype=`` (conf/infer/base.yaml): eval.py (and its local judge),
    generate.py, chat.py, predict.py and benchmarks/inference_memory.py all load through here, so the memory the
    benchmark measures is the memory chat uses.
    """
    hf_dir = resolve_hf_dir(path)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tokenizer = configure_tokenizer(load_tokenizer(hf_dir), chat_template)
    config = AutoConfig.from_pretrained(str(hf_dir))
    model_class = auto_class(config, is_classifier(config))
    model = model_class.from_pretrained(str(hf_dir), dtype=inference_dtype(dtype, device)).to(device).eval()
    return model, tokenizer


def load_image(model: PreTrainedModel, run: str | Path, image: str | Path) -> torch.Tensor:
    """pixel_values [1, 3, H, W] of the ``image`` file for ``model``, a vision-language run's (``run``: its folder,
    whose saved processor resizes and normalizes it as in training); chat.py and generate.py's ``image=``."""
    if not is_vision_language(model.config):
        raise ValueError(f"image={image}: {run} holds a text-only model; images need a stage=vlm run")
    try:
        opened = open_image(Path(image).expanduser())
    except (OSError, ValueError) as e:
        raise ValueError(f"image={image}: cannot read it ({type(e).__name__}: {e})") from e
    return pixel_values(load_processor(run), [opened])
