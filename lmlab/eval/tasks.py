"""Evaluation tasks of eval.py, one function per task in :data:`TASKS`, and the eval.json / eval.md report.

Every task reads its set through the data preset's own datamodule, so it sees exactly the samples training saw:

- ``ppl``: a text preset (PretrainDataModule). Causal: the non-overlapping windows of ``seq_len + 1`` tokens over
  the EOS-joined token stream of the split (the same windows, hence the same number, as training's ``val/ppl``;
  a last window shorter than that is left out). T5: the decoder labels of the span-corruption pairs of those windows.
- ``sft``: a prompt/response preset (SFTDataModule): the response tokens only (-100 on prompt and padding);
  for T5 the decoder's labels. ``source=<name>`` keeps one source of a mixture preset (its held-out rows with
  split=val).
Both report ``loss`` = summed token NLL / number of predicted tokens over the whole set, ``ppl = exp(loss)`` (not a
mean of batch perplexities) and ``acc`` = share of predicted tokens whose argmax is the label.
- ``rouge``: a prompt/response preset: the model's reply to each conversation's first user turn against the
  dataset's reply, ROUGE-1/2/L F1 (lmlab.eval.rouge; ``char`` segmentation for Chinese).
- ``judge``: the same replies scored 0-100 by a judge model (lmlab.eval.judge).
- ``chat``: replies to fixed user prompts (``prompts``: a text file, one per line, e.g.
  benchmarks/prompts/zh_chat_20.txt) through the run's chat template: their distinct-2 and the share caught in a
  repetition loop (lmlab.eval.diversity), with every reply in replies.jsonl to read.
- ``classify``: a classification preset (ClassificationDataModule) and a stage=classify run: accuracy, macro F1,
  per-class precision and recall, and the confusion matrix (confusion.csv/png), on split train, val or test; texts
  are cut where training cut them (the length saved in the run's tokenizer).
- ``vqa``: an image chat preset (VisionChatDataModule) and a stage=vlm run: exact-match accuracy of the greedy answers
  to each record's first question, overall and per question type, next to the blind baseline (each question's most
  frequent training answer); ``blank_image=true`` zeroes the images.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.base import LMDataModule
from datamodules.classification import ClassificationDataModule
from datamodules.pretrain import PretrainDataModule
from datamodules.sft import SFTDataModule, first_exchange
from datamodules.vision import VisionChatDataModule
from lightning_modules.classifier import (
    THRESHOLD_KEY,
    decide,
    exported_threshold,
    metric_set,
    scalar_metrics,
    write_confusion,
)
from lightning_modules.lm import lm_forward
from lmlab.core.losses import label_token_stats
from lmlab.core.models import is_vision_language
from lmlab.core.tokenizer import render_prompt, require_chat_template, trained_max_length
from lmlab.core.vision import image_slots, load_processor
from lmlab.eval.diversity import distinct_n, in_repetition_loop
from lmlab.eval.judge import Judge, judge_prompt
from lmlab.eval.rouge import rouge_scores
from lmlab.infer.generation import generate_texts

REPO = Path(__file__).resolve().parent.parent


@dataclass
class TaskResult:
    """What a task measured: ``metrics`` (logged), ``info`` (counts and settings for eval.json), per-item ``rows``
    (written to ``rows_file`` in the output folder)."""

    metrics: dict[str, float | None]
    info: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    rows_file: str | None = None


@torch.no_grad()
def token_metrics(
    model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True
) -> dict[str, float]:
    """Token-weighted NLL, perplexity and accuracy over every label that is not -100, summed over the whole set.

    Batches are lmlab.core.collate's (causal labels already shifted), so the logits align with the labels.
    """
    nll, correct, count = 0.0, 0, 0
    for batch in tqdm(batches, desc="eval", disable=not progress):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = lm_forward(model, batch, with_loss=False).logits
        stats = label_token_stats(logits, batch["labels"])
        nll, correct, count = nll + stats[0].item(), correct + stats[1].item(), count + stats[2].item()
    if not count:
        raise ValueError("the evaluation set has no label tokens")
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": correct / count, "tokens": count}


def connected_data(cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LMDataModule:
    """The data preset's datamodule, connected as train.py connects a run's: the loaded model's arch, ``seq_len`` as
    the max length, ``batch_size``, ``seed`` and the tokenizer's chat template (the one ``template=`` set in
    lmlab.infer.generation.load_for_inference, else the run's own)."""
    dm = instantiate(cfg.data)
    dm.connect(
        tokenizer,
        arch="seq2seq" if model.config.is_encoder_decoder else "causal",
        max_length=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        chat_template=tokenizer.chat_template,
    )
    if is_vision_language(model.config):  # its image placeholder, tokens per image and image processing
        dm.connect_images(*image_slots(model, tokenizer), load_processor(cfg.run))
    return dm


def _split(dm: LMDataModule, split: str) -> Dataset:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: choose val or train")
    return dm.val_set if split == "val" else dm.train_set


def _limited(items: Any, limit: int | None) -> Any:
    return items if limit is None else Subset(items, range(min(limit, len(items))))


def _require(dm: LMDataModule, kind: type, task: str, what: str) -> None:
    if not isinstance(dm, kind):
        raise ValueError(
            f"task={task} reads {what}, but the data preset builds a {type(dm).__name__}; "  # noqa: TRY004 - a wrong data= choice
            f"choose a {what} preset (data=...)"
        )


def _loss_task(dm: LMDataModule, model: PreTrainedModel, cfg: DictConfig) -> TaskResult:
    dm.prepare_data()
    dm.setup()
    if cfg.get("source"):
        _require(dm, SFTDataModule, "sft source=...", "prompt/response")
        dataset = _limited(dm.source_set(cfg.split, cfg.source), cfg.limit)
    else:
        dataset = _limited(_split(dm, cfg.split), cfg.limit)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=dm.collator())
    metrics = token_metrics(model, loader, cfg.progress)
    tokens = metrics.pop("tokens")
    return TaskResult(metrics, {"items": len(dataset), "tokens": tokens, "skipped": dict(dm.skips.skipped)})


def task_ppl(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """Perplexity of a text set (see the module docstring for what is predicted)."""
    _require(dm, PretrainDataModule, "ppl", "text")
    return _loss_task(dm, model, cfg)


def task_sft(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """Loss, perplexity and token accuracy on the responses of a prompt/response set."""
    _require(dm, SFTDataModule, "sft", "prompt/response")
    return _loss_task(dm, model, cfg)


def prompt_pairs(dm: SFTDataModule, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Each conversation of the split up to its first reply: where it comes from, the rendered prompt (with the
    reply header), the user's turn as plain text (for a judge) and the dataset's reply (the reference)."""
    if not dm.chat_template:
        require_chat_template(dm.tokenizer)
    train, val = dm.split()
    pairs = []
    for source, line, messages in (val if split == "val" else train)[:limit]:
        first = first_exchange(messages)
        user = messages[first - 1]
        pairs.append(
            {
                "source": source,
                "line": line,
                "prompt": dm.render_prompt(messages[:first]),
                "question": user["content"] + (f"\n\n{user['input']}" if user.get("input") else ""),
                "reference": messages[first]["content"],
            }
        )
    return pairs


def _replies(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, Any]]
) -> list[str]:
    settings = OmegaConf.to_container(cfg.generation)
    torch.manual_seed(cfg.seed)
    replies: list[str] = []
    for start in tqdm(range(0, len(pairs), cfg.batch_size), desc="generate", disable=not cfg.progress):
        batch = pairs[start : start + cfg.batch_size]
        replies += generate_texts(model, tokenizer, [p["prompt"] for p in batch], settings, cfg.batch_size)
    return replies


def task_rouge(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """ROUGE-1/2/L F1 of the model's replies against the references, with the generation config."""
    _require(dm, SFTDataModule, "rouge", "prompt/response")
    pairs = prompt_pairs(dm, cfg.split, cfg.limit)
    replies = _replies(cfg, model, tokenizer, pairs)
    scores = rouge_scores(replies, [p["reference"] for p in pairs], cfg.rouge_segmentation)
    metrics = {name: float(scores[name]) for name in ("rouge1", "rouge2", "rougeL")}
    rows = [{**p, "output": r} for p, r in zip(pairs, replies, strict=True)]
    return TaskResult(
        metrics,
        {
            "items": len(pairs),
            "rouge_segmentation": scores["segmentation"],
            "generation": OmegaConf.to_container(cfg.generation),
        },
        rows,
        "predictions.jsonl",
    )


def task_judge(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """The model's replies scored 0-100 by a judge; unparseable judge answers are counted and left out of the mean."""
    _require(dm, SFTDataModule, "judge", "prompt/response")
    judge = Judge.from_config(cfg.judge)
    pairs = prompt_pairs(dm, cfg.split, cfg.limit)
    replies = _replies(cfg, model, tokenizer, pairs)
    rows = [
        {**p, "output": r, "judge_prompt": judge_prompt(cfg.judge.prompt, p["question"], p["reference"], r)}
        for p, r in zip(pairs, replies, strict=True)
    ]
    for start in tqdm(range(0, len(rows), cfg.batch_size), desc="judge", disable=not cfg.progress):
        batch = rows[start : start + cfg.batch_size]
        for row, (answer, score) in zip(batch, judge.score([r["judge_prompt"] for r in batch]), strict=True):
            row.update(judge_answer=answer, score=score)
    scores = [r["score"] for r in rows if r["score"] is not None]
    metrics = {"judge_mean": sum(scores) / len(scores) if scores else None}  # None: no answer had a score
    info = {
        "items": len(rows),
        "scored": len(scores),
        "unparseable": len(rows) - len(scores),
        "judge": judge.describe(),
        "generation": OmegaConf.to_container(cfg.generation),
    }
    return TaskResult(metrics, info, rows, "judge_scores.jsonl")


def task_chat(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """Replies to the user prompts of ``cfg.prompts``, each a new one-turn chat; the data preset is not read."""
    if not cfg.prompts:
        raise ValueError("task=chat needs prompts=<text file, one user prompt per line>")
    questions = [q.strip() for q in Path(cfg.prompts).read_text(encoding="utf-8").splitlines() if q.strip()]
    require_chat_template(tokenizer)  # eval.py configured it with template= (lmlab.infer.generation.load_for_inference)
    pairs = [
        {"question": q, "prompt": render_prompt(tokenizer, [{"role": "user", "content": q}])}
        for q in questions[: cfg.limit]
    ]
    replies = _replies(cfg, model, tokenizer, pairs)
    loops = [in_repetition_loop(r) for r in replies]
    metrics = {
        "distinct2": distinct_n(replies, 2),
        "loop_share": sum(loops) / len(loops),
        "mean_chars": sum(len(r) for r in replies) / len(replies),
    }
    rows = [
        {"question": p["question"], "output": r, "loop": loop} for p, r, loop in zip(pairs, replies, loops, strict=True)
    ]
    return TaskResult(
        metrics,
        {"items": len(rows), "prompts": str(cfg.prompts), "generation": OmegaConf.to_container(cfg.generation)},
        rows,
        "replies.jsonl",
    )


@torch.no_grad()
def task_classify(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """Classifier metrics on a split of a classification preset, with one row per text (true and predicted label)."""
    _require(dm, ClassificationDataModule, "classify", "classification")
    if model.config.num_labels != len(dm.labels):
        raise ValueError(f"the model has {model.config.num_labels} classes but data.labels has {len(dm.labels)}")
    if (length := trained_max_length(tokenizer)) is not None:  # the classifier run's training length
        dm.max_length = length
    dm.setup()
    if cfg.split not in ("train", "val", "test"):
        raise ValueError(f"split={cfg.split!r}: choose train, val or test")
    examples = dm.splits()[cfg.split][: cfg.limit]
    dataset = _limited(getattr(dm, f"{cfg.split}_set"), cfg.limit)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=dm.collator())
    metrics = metric_set(len(dm.labels)).to(model.device)
    positive, threshold = exported_threshold(model.config)  # the decision rule training chose (else argmax)
    predicted: list[int] = []
    for batch in tqdm(loader, desc="classify", disable=not cfg.progress):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        decided = decide(logits, positive, threshold)
        metrics.update(decided, batch["labels"])
        predicted += decided.tolist()
    values = metrics.compute()
    result = {name: float(value) for name, value in scalar_metrics(values, dm.labels).items()}
    out = Path(cfg.out_dir) / "confusion"
    write_confusion(values["confusion"], dm.labels, out, f"{cfg.split}: accuracy {result['acc']:.4f}")
    rows = [
        {"source": source, "line": line, "text": text, "label": dm.labels[label], "predicted": dm.labels[p]}
        for (source, line, text, label), p in zip(examples, predicted, strict=True)
    ]
    info = {
        "items": len(rows),
        "labels": dm.labels,
        "max_length": dm.max_length,
        THRESHOLD_KEY: getattr(model.config, THRESHOLD_KEY, None),
        "confusion": values["confusion"].tolist(),
        "skipped": dict(dm.skips.skipped),
    }
    return TaskResult(result, info, rows, "predictions.jsonl")


def exact(answer: str) -> str:
    """An answer as exact match compares it: no surrounding space or end punctuation, lower case."""
    return answer.strip().strip("。.!！?？,，、\"'“”").strip().lower()


def question_answer(messages: list[dict]) -> tuple[str, str]:
    """A chat's prompt (its turns up to the first reply, as text) and that reply."""
    first = first_exchange(messages)
    return "\n".join(m["content"] for m in messages[:first]), messages[first]["content"]


def task_vqa(
    cfg: DictConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dm: LMDataModule
) -> TaskResult:
    """Exact-match accuracy of the model's answers to the split's image questions (:func:`exact`), overall and per
    question type (the records' ``type``), next to the blind baseline: the most frequent training answer to the same
    question text, what a model that never looks at the image does best. ``blank_image=true`` zeroes every image's
    pixel values: a model that uses its images then falls to about that baseline or below."""
    _require(dm, VisionChatDataModule, "vqa", "image chat")
    train, val = dm.split()
    records = (val if cfg.split == "val" else train)[: cfg.limit]
    if not records:
        raise ValueError(f"task=vqa: no {cfg.split} records (limit={cfg.limit})")
    pairs = dm.questions(records)
    settings = OmegaConf.to_container(cfg.generation)
    torch.manual_seed(cfg.seed)
    replies: list[str] = []
    for start in tqdm(range(0, len(pairs), cfg.batch_size), desc="generate", disable=not cfg.progress):
        images = dm.images(records[start : start + cfg.batch_size])
        prompts = [prompt for prompt, _ in pairs[start : start + cfg.batch_size]]
        replies += generate_texts(
            model, tokenizer, prompts, settings, cfg.batch_size, images=images * 0 if cfg.blank_image else images
        )
    answers: dict[str, Counter] = {}  # question -> how often each training answer replies to it
    for _, _, record in train:
        question, answer = question_answer(record["messages"])
        answers.setdefault(question, Counter())[exact(answer)] += 1
    majority = {question: counts.most_common(1)[0][0] for question, counts in answers.items()}
    rows = []
    for (source, line, record), (_, reference), reply in zip(records, pairs, replies, strict=True):
        question = question_answer(record["messages"])[0]
        rows.append(
            {
                "source": source,
                "line": line,
                "type": record["type"],
                "question": question,
                "reference": reference,
                "output": reply,
                "correct": exact(reply) == exact(reference),
                "majority": majority.get(question) == exact(reference),
            }
        )
    metrics = {"acc": sum(r["correct"] for r in rows) / len(rows), "blind_acc": _share(rows, "majority")}
    for kind in sorted({str(r["type"]) for r in rows if r["type"] is not None}):
        typed = [r for r in rows if str(r["type"]) == kind]
        metrics[f"acc/{kind}"] = _share(typed, "correct")
        metrics[f"blind_acc/{kind}"] = _share(typed, "majority")
    info = {
        "items": len(rows),
        "blank_image": bool(cfg.blank_image),
        "generation": settings,
    }
    return TaskResult(metrics, info, rows, "predictions.jsonl")


def _share(rows: list[dict[str, Any]], key: str) -> float:
    return sum(bool(r[key]) for r in rows) / len(rows)


Task = Callable[[DictConfig, PreTrainedModel, PreTrainedTokenizerBase, LMDataModule], TaskResult]
TASKS: dict[str, Task] = {
    "ppl": task_ppl,
    "sft": task_sft,
    "rouge": task_rouge,
    "judge": task_judge,
    "chat": task_chat,
    "classify": task_classify,
    "vqa": task_vqa,
}


def git_commit() -> str | None:
    """lmlab's commit, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def eval_record(task: str, run: str, data: dict[str, Any], result: TaskResult) -> dict[str, Any]:
    """The eval.json record."""
    return {
        "task": task,
        "run": run,
        "data": data,
        "metrics": result.metrics,
        **result.info,
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "lmlab_commit": git_commit(),
    }


def markdown(record: dict[str, Any]) -> str:
    """eval.md: what was evaluated, then one row per metric."""
    lines = [
        f"# eval: task={record['task']}",
        "",
        f"- run: `{record['run']}`",
        (f"- data: {record['data']['preset']} ({record['data']['split']}: {', '.join(record['data']['files'])})"),
    ]
    lines += [
        f"- {k}: {json.dumps(v, ensure_ascii=False)}"
        for k, v in record.items()
        if k not in ("task", "run", "data", "metrics")
    ]
    lines += ["", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {'n/a' if v is None else f'{v:.4f}'} |" for k, v in record["metrics"].items()]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, record: dict[str, Any], result: TaskResult) -> None:
    """eval.json, eval.md and the per-item rows (if any) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "eval.md").write_text(markdown(record), encoding="utf-8")
    if result.rows_file:
        with open(out_dir / result.rows_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
