"""Image chat data (stage=vlm): ``{image, messages}`` records, the image a path or encoded bytes.

A record is a chat (any shape :func:`datamodules.formats.to_messages` reads: ``messages``, LLaVA's
``conversations`` with ``from``/``value``, Alpaca, prompt/response) plus one ``image``: a path relative to the
record's file (or to ``image_root``, LLaVA's image folder), or the image's bytes (a parquet column of bytes, or
Hugging Face datasets' ``{bytes, path}`` struct). The prompt holds the image placeholder (``vision.image_token``,
LLaVA's ``<image>``) where the image goes; a record without one gets it at the start of its first user turn. The
placeholder becomes one token per image feature before the chat is rendered and encoded (as LlavaProcessor does),
so the -100 labels of :mod:`datamodules.sft` fall on the image and prompt positions alike: only the replies are
learned. Images are checked at setup (PIL's verify: their structure, no decoding) and decoded in the loader (its
worker processes on a GPU); a path is held, not the pixels (image bytes from parquet stay in memory). A missing or
broken image is a DataError naming file, line and field, or counted under on_error=skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from datamodules.formats import DataError, to_messages
from datamodules.sft import SFTDataModule, first_exchange, tokenize_conversation
from lmlab.core.vision import check_image, expand_images, image_prompt, open_image, pixel_values, with_placeholder

IMAGE_FIELD = "image"


def to_image_chat(record: Any, source: str, line: int, image_root: str | None = None) -> dict[str, Any]:
    """``{"image": path or bytes, "messages": [...], "type": str | None}``; ``type`` (e.g. a question's kind) is
    kept for per-type accuracy (eval.py task=vqa). A path is resolved against ``image_root``, else the file's folder,
    and must exist."""
    if not isinstance(record, dict):
        raise DataError(source, line, f"expected an object with fields, got {type(record).__name__}")
    image = record.get(IMAGE_FIELD)
    if isinstance(image, dict):  # Hugging Face datasets' Image feature in parquet: {bytes, path}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        if not image:
            raise DataError(source, line, "empty image bytes", field=IMAGE_FIELD)
    elif isinstance(image, str) and image.strip():
        path = Path(image_root or Path(source).parent) / image
        if not path.is_file():
            raise DataError(source, line, f"image file not found: {path}", field=IMAGE_FIELD)
        image = str(path)
    else:
        raise DataError(source, line, "missing: expected an image path or the image's bytes", field=IMAGE_FIELD)
    try:  # the file's structure (PIL's verify: no decoding), so a broken image stops setup, not a batch mid-run
        check_image(image)
    except Exception as e:
        raise DataError(source, line, f"cannot read the image ({type(e).__name__}: {e})", field=IMAGE_FIELD) from e
    kind = record.get("type")
    return {"image": image, "messages": to_messages(record, source, line), "type": kind, "where": (source, line)}


class ImageCollator:
    """The causal collator's batch (``inner``) plus ``pixel_values`` FloatTensor[B, 3, H, W], each sample's image
    decoded and processed here, in the loader; an image that cannot be decoded names its record."""

    def __init__(self, inner: Callable[[list], dict], processor: Any):
        self.inner = inner
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        images = []
        for sample in samples:
            try:
                images.append(open_image(sample["image"]))
            except Exception as e:  # PIL's UnidentifiedImageError, OSError on a cut-off file, ...
                source, line = sample["where"]
                raise DataError(source, line, f"cannot read the image ({type(e).__name__}: {e})", IMAGE_FIELD) from e
        batch = self.inner([{k: s[k] for k in ("input_ids", "labels")} for s in samples])
        batch["pixel_values"] = pixel_values(self.processor, images)
        return batch


class VisionChatDataModule(SFTDataModule):
    """Chats about one image each (see the module docstring); the split, mixture weights, chat template and label
    masking are SFTDataModule's. What the model decides arrives with :meth:`connect_images` after it is built: the
    placeholder token, how many features an image becomes, and the image processor."""

    packable = False

    def __init__(
        self,
        train_files: Sequence[str | dict],
        val_files: Sequence[str | dict] | None = None,
        val_fraction: float = 0.05,
        format: str = "auto",
        chat_template: str | None = None,
        image_root: str | None = None,
        split_seed: int = 42,
        on_error: str = "raise",
    ):
        super().__init__(train_files, val_files, val_fraction, format, chat_template, None, False, split_seed, on_error)
        self.image_root = image_root
        self.image_token: str | None = None
        self.image_tokens = 0
        self.processor: Any = None

    def connect_images(self, image_token: str, image_tokens: int, processor: Any) -> None:
        """The model's image placeholder, the number of its tokens per image (one per feature the vision tower
        gives), and the image processor (lmlab.core.vision): train.py's call once the model is built."""
        self.image_token, self.image_tokens, self.processor = image_token, image_tokens, processor

    def _read(self, files: Sequence[str | Any]) -> list[tuple[str, int, dict]]:
        return list(self.records(files, partial(to_image_chat, image_root=self.image_root)))

    def iter_texts(self) -> Iterator[str]:
        for _, _, record in self.split()[0]:
            for m in record["messages"]:
                yield m["content"]

    def tokenize(self, record: dict) -> dict[str, Any]:
        """input_ids and labels of the chat with its placeholder expanded, and the image to load with its record's
        file and line (``where``)."""
        if self.arch != "causal":
            raise ValueError("stage=vlm needs a causal language model (model=llama*, gpt2*)")
        messages = [
            dict(m, content=expand_images(m["content"], self.image_token, self.image_tokens))
            for m in with_placeholder(record["messages"], self.image_token)
        ]
        sample = tokenize_conversation(self.tokenizer, messages, self.max_length, False, self.chat_template)
        return {**sample, "image": record["image"], "where": record["where"]}

    def skip_reason(self, sample: dict) -> str | None:
        """SFTDataModule's, and a sample whose image tokens truncation cut (the model needs all of them)."""
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if int((sample["input_ids"] == image_id).sum()) != self.image_tokens:
            return f"samples whose {self.image_tokens} image tokens do not fit in seq_len={self.max_length}"
        return super().skip_reason(sample)

    def collator(self) -> ImageCollator:
        return ImageCollator(super().collator(), self.processor)

    def questions(self, records: Sequence[tuple[str, int, dict]]) -> list[tuple[str, str]]:
        """Each record's chat up to its first reply, rendered with its placeholder expanded (what generation
        continues), and that reply."""
        pairs = []
        for _, _, record in records:
            messages = record["messages"]
            first = first_exchange(messages)
            prompt = image_prompt(
                self.tokenizer, messages[:first], self.image_token, self.image_tokens, self.chat_template
            )
            pairs.append((prompt, messages[first]["content"]))
        return pairs

    def images(self, records: Sequence[tuple[str, int, dict]]) -> torch.Tensor:
        """pixel_values of the records' images, in their order."""
        return pixel_values(self.processor, [open_image(record["image"]) for _, _, record in records])

    def sample_pairs(self, n: int) -> list[tuple[str, str | None]]:
        """The first ``n`` validation records' :meth:`questions`; their images are :meth:`sample_images`."""
        return self.questions(self.split()[1][:n])

    def sample_images(self, n: int) -> torch.Tensor:
        return self.images(self.split()[1][:n])
