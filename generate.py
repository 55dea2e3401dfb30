"""Generate from a run folder or HF folder, causal or encoder-decoder (T5).

    python generate.py run=<run or hf dir> prompt="..."            # task=reply: print the model's reply
    python generate.py run=<vlm run> image=<png/jpg> prompt="..."   # a vision-language run's answer about an image
    python generate.py task=rejected run=<sft run> data=<preset> generation=sample [out=...] [limit=N]

task=rejected makes preference data from the model's own samples: for every record of the preset's
training files the dataset answer is chosen and the model's reply to the same prompt is rejected
(lmlab/infer/rejected.py; empty, repetitive and near-duplicate samples are dropped and counted). The rows go
to ``out`` (default ``<run>/rejected/<preset>.jsonl``); rerunning the same command resumes.

Uses only transformers on the exported hf/ folder (chat template from the tokenizer; a causal
LM or an encoder-decoder such as T5), so what it shows is what any transformers user of the
export gets. Generation settings come from conf/generation (`generation=beam`, `generation.top_p=0.9`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.formats import SkipCounter, to_messages
from datamodules.sources import adapted_records, parse_sources
from lmlab.core.tokenizer import render_prompt
from lmlab.core.vision import image_prompt, image_slots
from lmlab.infer.generation import generate_texts, load_for_inference, load_image
from lmlab.infer.rejected import RejectedSettings, build_rejected

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


def reply(cfg: DictConfig) -> str:
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype)
    image = load_image(model, cfg.run, cfg.image) if cfg.image else None  # a vlm run's answer about it
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": cfg.prompt}
    ]
    if cfg.raw:
        if image is not None:
            raise ValueError("image= needs the chat template (raw=false): the image's tokens go into the prompt")
        text = cfg.prompt
    elif image is not None:
        text = image_prompt(tokenizer, messages, *image_slots(model, tokenizer))
    else:
        text = render_prompt(tokenizer, messages)
    torch.manual_seed(cfg.seed)
    return generate_texts(model, tokenizer, [text], cfg.generation, images=image)[0]


def conversations(data: DictConfig, on_error: str, skips: SkipCounter) -> Iterator[tuple[str, int, Any]]:
    """(source, line, messages) of every record of the preset's training files, or (source, line, DataError)
    for a record that cannot be adapted (build_rejected raises it or counts it, by on_error)."""
    fmt = OmegaConf.to_container(data.format) if OmegaConf.is_config(data.format) else data.format
    sources = parse_sources(OmegaConf.to_container(data.train_files, resolve=True))  # paths or mixture entries
    yield from adapted_records(sources, fmt, to_messages, skips if on_error == "skip" else None)


def rejected(cfg: DictConfig) -> dict[str, Any]:
    """Preference pairs from the model's own samples; returns the counts written to <out>.meta.json."""
    settings = RejectedSettings.from_config(cfg)  # batch_size, similarity_threshold, degenerate, limit, on_error
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    skips = SkipCounter()
    info = {
        "run": str(cfg.run),
        "data": OmegaConf.to_container(cfg.data.train_files, resolve=True),
        "generation": OmegaConf.to_container(cfg.generation),
        "seed": cfg.seed,
        "similarity_threshold": cfg.similarity_threshold,
        "degenerate": OmegaConf.to_container(cfg.degenerate),
    }
    return build_rejected(
        model,
        tokenizer,
        conversations(cfg.data, cfg.on_error, skips),
        cfg.out,
        cfg.generation,
        settings,
        skips=skips,
        info=info,
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    if cfg.task == "reply":
        print(reply(cfg))
    elif cfg.task == "rejected":
        meta = rejected(cfg)
        print(
            json.dumps(
                {k: meta[k] for k in ("kept", "dropped", "total", "this_run", "unreadable_lines")}, ensure_ascii=False
            )
        )
        print(f"wrote {meta['kept']} pairs to {cfg.out} (counts in {cfg.out}.meta.json)")
    else:
        raise ValueError(f"task={cfg.task!r}: choose reply or rejected")


if __name__ == "__main__":
    main()
