"""Vision-language models (stage=vlm): a LLaVA built from a vision tower, a projector and an lmlab language model.

transformers' ``LlavaForConditionalGeneration`` holds the three parts: the vision tower (a CLIP or SigLIP vision
model, random from ``vision.config`` or pretrained from ``vision.from``) turns an image into one feature per patch,
the projector (two linear layers) maps each feature into the language model's embedding space, and those vectors
replace the image placeholder tokens of the prompt. The language model is the run's own (built from ``model=`` or
loaded from ``init_from``), so a chat model trained by lmlab learns to see. The tokenizer gets the placeholder as a
special token (``vision.image_token``), repeated once per image feature in every prompt (:func:`expand_images`),
as transformers' LlavaProcessor does; the export holds that processor, so plain transformers runs the model.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.tokenization_utils_base import AddedToken

from lmlab.core.models import count_parameters, is_vision_language, resolve_hf_dir
from lmlab.core.tokenizer import render_prompt

log = logging.getLogger(__name__)

PARTS = ("vision", "projector", "language")  # freeze=[...] groups of a vision-language model


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> PreTrainedTokenizerBase:
    """The tokenizer with ``image_token`` as a special token of its own (appended to the vocabulary when missing), so
    a prompt's placeholders encode to one id each and never merge with the text around them. A tokenizer saved by a
    vlm run has it already, and keeps its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    tokenizer.image_token = image_token  # read by LlavaProcessor
    return tokenizer


def parts(model: LlavaForConditionalGeneration) -> dict[str, list[torch.nn.Module]]:
    """The modules of each freeze group: ``vision`` (the tower), ``projector``, ``language`` (the language model and
    its output head)."""
    inner = model.model
    return {
        "vision": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "language": [inner.language_model, model.lm_head],
    }


def _vision_tower_config(vision_cfg: DictConfig) -> PretrainedConfig:
    """The tower's config: a pretrained one's (``vision.from``: the vision part of a CLIP/SigLIP folder or hub id), else
    the preset's ``vision.config``."""
    if vision_cfg["from"]:
        config = AutoConfig.from_pretrained(str(vision_cfg["from"]))
        return getattr(config, "vision_config", None) or config
    return instantiate(vision_cfg.config, _convert_="all")


def _load_tower(model: LlavaForConditionalGeneration, source: str) -> None:
    """The pretrained weights of ``source`` (a vision model, or a CLIP/SigLIP whose vision part is taken) in the
    tower."""
    tower_class = type(model.model.vision_tower)
    pretrained = tower_class.from_pretrained(source)
    missing, unexpected = model.model.vision_tower.load_state_dict(pretrained.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"vision.from={source}: the tower's weights do not fit ({missing or unexpected})")
    log.info("vision tower: %s from %s", tower_class.__name__, source)


def attach_vision(
    language_model: PreTrainedModel, vision_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase
) -> LlavaForConditionalGeneration:
    """A LLaVA whose language model and output head are ``language_model``'s (its weights copied in), with a vision
    tower and a projector built from ``vision_cfg`` (conf/vision/). ``tokenizer`` must hold ``vision.image_token``
    (:func:`add_image_token`); the language model's embeddings grow to the tokenizer's size, the new rows drawn as
    transformers does (the mean and covariance of the old ones). The number of image features per image is measured
    with one forward pass of the tower and saved as ``image_seq_length``."""
    if language_model.config.is_encoder_decoder:
        raise ValueError("stage=vlm needs a causal language model (model=llama*, gpt2*): T5 reads no image features")
    if getattr(language_model.config, "num_local_experts", None):
        raise ValueError(
            "stage=vlm does not take a mixture of experts (model=llama-moe*): LLaVA's loss has no router "
            "load-balancing term; choose a dense preset"
        )
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))
    text_config = copy.deepcopy(language_model.config)
    if text_config.tie_word_embeddings and not hasattr(language_model.base_model, "embed_tokens"):
        # GPT-2's table is wte: LLaVA ties its head to embed_tokens only
        log.warning("%s: its output head is untied from the embeddings in the LLaVA", type(language_model).__name__)
        text_config.tie_word_embeddings = False
    vision_config = _vision_tower_config(vision_cfg)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(vision_cfg.image_token),
        projector_hidden_act=vision_cfg.projector_act,
        vision_feature_layer=vision_cfg.feature_layer,
        vision_feature_select_strategy=select_strategy(vision_cfg.select_strategy, vision_config),
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.base_model.state_dict())
    model.lm_head.weight.data.copy_(language_model.get_output_embeddings().weight.data)
    if vision_cfg["from"]:
        _load_tower(model, str(vision_cfg["from"]))
    settle_tower(model)
    model.train()
    size = config.vision_config.image_size
    log.info(
        "built LlavaForConditionalGeneration: %s tower (%.2fM), projector (%.2fM), language model (%.2fM); "
        "%d image tokens per %dx%d image",
        type(model.model.vision_tower).__name__,
        *(count_parameters(torch.nn.ModuleList(modules)) / 1e6 for modules in parts(model).values()),
        model.config.image_seq_length,
        size,
        size,
    )
    return model


def select_strategy(choice: str, vision_config: PretrainedConfig) -> str:
    """``vision.select_strategy``; ``auto``: ``default`` (drop the first feature, CLIP's CLS) for a tower that has a
    class embedding, ``full`` for one without (SigLIP), whose first feature is a patch."""
    if choice != "auto":
        return choice
    return "full" if "siglip" in vision_config.model_type else "default"


def settle_tower(model: LlavaForConditionalGeneration) -> None:
    """Measure what one image becomes, with one forward and backward pass of the tower on a blank image: the number of
    features (saved as ``image_seq_length``), and the tower's parameters no feature depends on (its final norm, the
    layers above ``vision_feature_layer``, a pooling head), which get no gradient and so are frozen: under DDP a
    trainable parameter without a gradient is an error, and they would count as trained."""
    size = model.config.vision_config.image_size
    tower = model.model.vision_tower
    features = model.model.get_image_features(pixel_values=torch.zeros(1, 3, size, size)).pooler_output[0]
    features.sum().backward()
    idle = [p for p in tower.parameters() if p.requires_grad and p.grad is None]
    for p in idle:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.config.image_seq_length = features.shape[0]
    if idle:
        log.info("vision tower: %d parameters no image feature depends on are frozen", sum(p.numel() for p in idle))


def with_vision(
    model: PreTrainedModel, vision_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, init_from: str | None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """stage=vlm's model and image processor: ``model`` (a language model) with a vision tower and projector from
    ``vision_cfg`` (:func:`attach_vision`), or, when ``init_from`` was a vlm run already, that model and the processor
    saved with it (``vision_cfg`` then builds nothing). The tokenizer gets the image token either way."""
    if is_vision_language(model.config):
        log.warning(
            "init_from=%s is a vision-language run: its tower, projector and processor go on; vision= builds nothing",
            init_from,
        )
        add_image_token(tokenizer, image_slots(model, tokenizer)[0])
        settle_tower(model)
        return model, load_processor(init_from)
    add_image_token(tokenizer, vision_cfg.image_token)
    model = attach_vision(model, vision_cfg, tokenizer)
    return model, image_processor(vision_cfg, model.config.vision_config.image_size)


def image_slots(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    """``model``'s image placeholder token and how many of them one image fills (its ``image_seq_length``)."""
    return tokenizer.convert_ids_to_tokens(model.config.image_token_id), model.config.image_seq_length


def image_processor(vision_cfg: DictConfig, image_size: int) -> Any:
    """The pretrained tower's own image processor (``vision.from`` with its preprocessor_config.json, or a hub id),
    else a CLIP one that resizes to ``image_size`` and normalizes with ``vision.image_mean`` / ``image_std``."""
    source = vision_cfg["from"]
    if source and not (Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file()):
        return AutoImageProcessor.from_pretrained(str(source))
    # the PIL backend (transformers >= 5.20 names it so; before, CLIPImageProcessor was it): no torchvision needed
    clip_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return clip_processor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(vision_cfg.image_mean),
        image_std=list(vision_cfg.image_std),
    )


def build_processor(
    model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, images: Any
) -> LlavaProcessor:
    """transformers' LlavaProcessor for ``model``: its ``processor(images=..., text=...)`` expands each placeholder to
    the model's ``image_seq_length`` tokens, as :func:`expand_images` does in training."""
    config = model.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    drop_first = config.vision_feature_select_strategy == "default"
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=tokenizer.image_token,
        num_additional_image_tokens=config.image_seq_length - patches + int(drop_first),
        chat_template=multimodal_template(tokenizer.chat_template, tokenizer.image_token),
    )


# Jinja put before a text chat template: a message whose content is a list of parts (transformers' multimodal chat
# format, [{"type": "image", ...}, {"type": "text", "text": ...}]) becomes text, each image part the placeholder and a
# line break (where with_placeholder puts it); string contents pass as they are.
CONTENT_PARTS = """{%- set ns = namespace(messages=[]) -%}
{%- for m in messages -%}
{%- if m.content is string -%}{%- set ns.messages = ns.messages + [m] -%}
{%- else -%}{%- set text = namespace(value='') -%}
{%- for part in m.content -%}
{%- if part.type == 'image' -%}{%- set text.value = text.value + IMAGE_TOKEN + '\n' -%}
{%- elif part.type == 'text' -%}{%- set text.value = text.value + part.text -%}{%- endif -%}
{%- endfor -%}
{%- set ns.messages = ns.messages + [{'role': m.role, 'content': text.value}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = ns.messages -%}
"""


def multimodal_template(chat_template: str, image_token: str) -> str:
    """``chat_template`` (the run's text layout) that also renders list contents (:data:`CONTENT_PARTS`), so the
    exported processor's ``apply_chat_template`` takes the usual multimodal messages and gives training's prompt."""
    return CONTENT_PARTS.replace("IMAGE_TOKEN", json.dumps(image_token)) + chat_template


def export_processor(
    model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, images: Any, out_dir: str | Path
) -> None:
    """Save the model's LlavaProcessor (:func:`build_processor`) beside it, so ``AutoProcessor.from_pretrained`` loads
    tokenizer and image processing together."""
    build_processor(model, tokenizer, images).save_pretrained(str(out_dir))


def load_processor(path: str | Path) -> Any:
    """The image processor saved with a vision-language model (a vlm run folder or its hf/)."""
    return AutoProcessor.from_pretrained(str(resolve_hf_dir(path))).image_processor


def expand_images(text: str, image_token: str, count: int) -> str:
    """``text`` with each ``image_token`` repeated ``count`` times: one placeholder per image feature."""
    return text.replace(image_token, image_token * count)


def image_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    image_token: str,
    count: int,
    chat_template: str | None = None,
) -> str:
    """``messages`` (ending with a user turn) rendered as a prompt about one image, with ``chat_template`` (None: the
    tokenizer's): the placeholder placed as in training (:func:`with_placeholder`) and expanded to ``count`` tokens
    (:func:`image_slots`). Validation samples, eval.py, generate.py and chat.py all prompt through here."""
    rendered = render_prompt(tokenizer, with_placeholder(messages, image_token), chat_template)
    return expand_images(rendered, image_token, count)


def with_placeholder(messages: list[dict], image_token: str) -> list[dict]:
    """``messages`` whose prompt holds the image placeholder exactly once: as the data has it, else at the start of
    the first user turn (LLaVA's ``<image>\\n``). More than one, or one in a reply, is refused."""
    count = sum(m["content"].count(image_token) for m in messages)
    if count > 1:
        raise ValueError(f"{count} image placeholders {image_token!r}: one image per record")
    if count == 1:
        if any(image_token in m["content"] for m in messages if m["role"] == "assistant"):
            raise ValueError(f"the image placeholder {image_token!r} is in a reply; it belongs in the prompt")
        return messages
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    placed = dict(messages[first_user], content=f"{image_token}\n{messages[first_user]['content']}")
    return [*messages[:first_user], placed, *messages[first_user + 1 :]]


def check_image(image: str | Path | bytes) -> None:
    """Raise if ``image`` is not a readable image file (PIL's verify: its structure and checksums, without decoding)."""
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        opened.verify()


def open_image(image: str | Path | bytes) -> Image.Image:
    """An RGB PIL image from a path or encoded bytes (PNG, JPEG, ...)."""
    opened = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    return opened.convert("RGB")


def pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """FloatTensor[N, 3, H, W]: the images resized and normalized as the tower was trained on."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]
