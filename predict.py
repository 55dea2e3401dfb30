"""Label new texts with a classifier run: `python predict.py run=<run or hf dir> input=<file | ->`.

One text per line from a file, or from stdin with ``input=-``; prints ``label<TAB>probability<TAB>text``
per line (and writes jsonl rows to ``output=`` when given). The model is transformers' own on the
exported hf/ folder (AutoModelForSequenceClassification + its tokenizer, the same truncation as
training). The label is the argmax or, where the run chose a threshold on validation
(``stage.module.positive``), the positive class wherever its log-odds reach the exported
``config.decision_threshold``: the rule the run's test metrics were measured with. A plain
transformers ``pipeline`` takes the argmax instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_modules.classifier import decide, exported_threshold
from lmlab.core.models import is_classifier
from lmlab.infer.generation import load_for_inference

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


def load_classifier(run: str, device: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The exported classifier (eval mode) and its tokenizer; a language-model folder is a clear error."""
    model, tokenizer = load_for_inference(run, device, dtype)
    if not is_classifier(model.config):
        raise ValueError(f"run={run} holds a {type(model).__name__}, not a classifier (train one with stage=classify)")
    return model, tokenizer


@torch.inference_mode()
def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int,
    max_length: int | None = None,
) -> Iterator[tuple[str, float]]:
    """(label, its probability) per text, in batches; the model pools each text's last real token.

    Texts are cut at ``max_length`` tokens, by default the tokenizer's model_max_length, which a
    stage=classify run sets to the length it trained with. The label is decided by the run's
    exported threshold where it has one (so it may be a class with probability below 0.5).
    """
    positive, threshold = exported_threshold(model.config)
    for start in tqdm(
        range(0, len(texts), batch_size),
        desc="predict",
        unit="batch",
        file=sys.stderr,
        disable=len(texts) <= batch_size,
    ):
        batch = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(model.device)
        logits = model(**batch).logits.float()
        chosen = decide(logits, positive, threshold)
        probs = logits.softmax(-1)[torch.arange(len(chosen)), chosen]
        for i, p in zip(chosen.tolist(), probs.tolist(), strict=True):
            yield model.config.id2label[i], p


def read_texts(source: str) -> list[str]:
    """Non-empty lines of a file, or of stdin for ``-``."""
    lines = sys.stdin.read().splitlines() if source == "-" else Path(source).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    model, tokenizer = load_classifier(cfg.run, cfg.device, cfg.dtype)
    texts = read_texts(cfg.input)
    rows = [
        {"text": t, "label": label, "probability": p}
        for t, (label, p) in zip(texts, predict(model, tokenizer, texts, cfg.batch_size, cfg.max_length), strict=True)
    ]
    for row in rows:
        print(f"{row['label']}\t{row['probability']:.4f}\t{row['text']}")
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
