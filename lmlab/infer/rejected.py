"""Preference pairs from a model's own samples: the dataset answer is chosen, the model's answer rejected.

``python generate.py task=rejected run=<sft run> data=<preset>`` reads every record of the
preset's training files, renders its prompt (the conversation up to the last assistant turn) with the
tokenizer's chat template, samples the model's reply and writes one jsonl row per kept pair::

    {"messages": [...prompt turns, ending with the user...], "chosen": "<dataset answer>",
     "rejected": "<the model's sample>", "source": "<file>", "line": <line>}

A sample is dropped (and counted by reason) when it is unusable as a rejected answer: empty or
repetitive (:func:`degenerate`), or so close to the dataset answer that the pair teaches nothing
(:func:`too_similar`). Bad records (no assistant answer, no user turn before it, a template error)
are dropped as ``bad record`` under ``on_error=skip`` and raise otherwise.

Resumable: besides ``<out>`` a sidecar ``<out>.done`` lists every processed record, one JSON line
``{"source", "line", "status"}`` (status ``kept`` or the drop reason). Each batch's rows are written
and flushed to ``<out>`` before its keys go to ``<out>.done``, and on start the keys of the rows already
in ``<out>`` count as done too, so a rerun after a crash never writes a row twice (a torn last line
is cut off first). ``<out>.meta.json`` holds the counts over the whole file and this run's share.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.formats import DataError, SkipCounter
from lmlab.core.tokenizer import render_prompt
from lmlab.infer.generation import generate_texts

Key = tuple[str, int]
BAD_RECORD = "bad record"
TOO_SIMILAR = "too_similar"


def _normalise(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def degenerate(
    text: str, ngram_sizes: Sequence[int] = (3, 4, 5), max_ngram_share: float = 0.5, min_repeats: int = 3
) -> str | None:
    """Why ``text`` is unusable as an answer (``"empty"`` or ``"repetition"``), or None if it is fine.

    Rule (on the text with whitespace collapsed): for each n in ``ngram_sizes``, take the most frequent
    character n-grams; the text is a repetition when one of them occurs at least ``min_repeats`` times
    without overlapping and those occurrences cover more than ``max_ngram_share`` of the text's characters.
    That catches short loops ("好的好的好的…", "the the the …", "!!!!!!"), which an undertrained or badly
    sampled model falls into; a normal sentence's most frequent 3-5-gram covers a few percent of it.
    """
    norm = _normalise(text)
    if not norm:
        return "empty"
    for n in ngram_sizes:
        if n <= 0 or len(norm) < n * min_repeats:
            continue
        counts = Counter(norm[i : i + n] for i in range(len(norm) - n + 1))
        for gram, _ in counts.most_common(5):  # the most frequent (overlapping) n-grams are the candidates
            repeats = norm.count(gram)  # non-overlapping occurrences
            if repeats >= min_repeats and repeats * n / len(norm) > max_ngram_share:
                return "repetition"
    return None


def too_similar(sample: str, chosen: str, threshold: float) -> bool:
    """Is the sample a near-duplicate of the chosen answer (SequenceMatcher ratio >= ``threshold``)?"""
    matcher = difflib.SequenceMatcher(None, _normalise(sample), _normalise(chosen), autojunk=False)
    # the cheap upper bounds first: most pairs are far apart
    return (
        matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
    )


def split_prompt(messages: Any, source: str, line: int) -> tuple[list[dict], str]:
    """(prompt turns, chosen answer): the conversation up to its last assistant turn, and that turn's text."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(source, line, f"expected a list of chat messages, got {type(messages).__name__}")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError(source, line, "no assistant turn: nothing to keep as the chosen answer")
    prompt, answer = messages[:last], messages[last].get("content")
    if not prompt or prompt[-1].get("role") != "user":
        raise DataError(source, line, "the last assistant turn does not answer a user turn")
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(source, line, "the last assistant turn is empty")
    return prompt, answer


def _complete_lines(path: Path) -> list[str]:
    """The file's complete lines; a torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].decode("utf-8").splitlines()


def _key(row: Mapping[str, Any]) -> Key:
    return str(row["source"]), int(row["line"])


def load_progress(out_path: Path, done_path: Path) -> dict[Key, str]:
    """Status (``kept`` or the drop reason) of every record already processed into ``out_path``.

    Rows in ``out_path`` are done even when their keys missed ``done_path`` (a crash between the two
    writes); such keys are added to ``done_path`` now, so the two files agree again.
    """
    status: dict[Key, str] = {}
    for text in _complete_lines(done_path):
        if text.strip():
            entry = json.loads(text)
            status[_key(entry)] = entry["status"]
    missing = []
    for text in _complete_lines(out_path):
        if text.strip():
            key = _key(json.loads(text))
            if status.get(key) != "kept":
                missing.append(key)
            status[key] = "kept"
    if missing:
        with open(done_path, "a", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"source": s, "line": n, "status": "kept"}, ensure_ascii=False) + "\n" for s, n in missing
            )
    return status


def _append(f, lines: list[str]) -> None:
    """Append lines and make them durable before anything that depends on them is written."""
    if lines:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def build_rejected(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[tuple[str, int, Any]],
    out_path: str | Path,
    settings: Mapping[str, Any],
    batch_size: int = 8,
    similarity_threshold: float = 0.9,
    degenerate_args: Mapping[str, Any] | None = None,
    limit: int | None = None,
    on_error: str = "raise",
    skips: SkipCounter | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (prompt, chosen = dataset answer, rejected = the model's sample) rows to ``out_path``; return the counts.

    ``records`` yields ``(source, line, messages)`` (chat messages whose last assistant turn is the
    dataset answer, as :func:`datamodules.formats.to_messages` makes them), or ``(source, line, error)``
    with the DataError of a record that could not be adapted. The first ``limit`` records are
    processed (None: all); records already in ``out_path`` or its ``.done`` sidecar are passed over, so
    rerunning the same command resumes. Samples come from :func:`lmlab.infer.generation.generate_texts`
    with ``settings`` (conf/generation), ``batch_size`` prompts at a time. ``on_error``: ``raise`` stops
    at a bad record, ``skip`` counts it as ``bad record``. ``skips`` (the reader's counter of unreadable
    lines) and ``info`` (e.g. the settings used) are reported in ``<out>.meta.json``, which also holds
    the returned counts: ``kept``, ``dropped`` by reason, ``total`` over the whole file and ``this_run``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose raise or skip")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template to render prompts with; use an SFT run's export")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done_path = out_path.with_name(out_path.name + ".done")
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    deg_args = dict(degenerate_args or {})
    status = load_progress(out_path, done_path)
    totals = Counter(status.values())
    run: Counter = Counter()
    examples: list[str] = []  # the first bad records' errors, for the meta
    model.eval()

    def write_meta() -> dict[str, Any]:
        def split(counts: Counter) -> dict[str, Any]:
            dropped = {k: v for k, v in sorted(counts.items()) if k not in ("kept", "already done")}
            return {"kept": counts["kept"], "dropped": dropped, "total": counts["kept"] + sum(dropped.values())}

        this_run = {**split(run), "already_done": run["already done"], "bad_record_examples": examples}
        meta = {
            **split(totals),
            "this_run": this_run,
            "unreadable_lines": skips.total if skips is not None else 0,
            "out": str(out_path),
            **(info or {}),
        }
        meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return meta

    def mark(key: Key, outcome: str, done: list[str]) -> None:
        """Count a record's outcome (kept or a drop reason) and queue its done-key."""
        status[key] = outcome
        totals[outcome] += 1
        run[outcome] += 1
        done.append(json.dumps({"source": key[0], "line": key[1], "status": outcome}, ensure_ascii=False) + "\n")

    def flush(pending: list[tuple[Key, list[dict], str, str]], done: list[str]) -> None:
        samples = (
            generate_texts(model, tokenizer, [text for *_, text in pending], settings, batch_size) if pending else []
        )
        rows = []
        for (key, prompt, chosen, _), sample in zip(pending, samples, strict=True):
            reason = degenerate(sample, **deg_args)
            if reason is not None:
                mark(key, f"degenerate: {reason}", done)
            elif too_similar(sample, chosen, similarity_threshold):
                mark(key, TOO_SIMILAR, done)
            else:
                rows.append(
                    json.dumps(
                        {"messages": prompt, "chosen": chosen, "rejected": sample, "source": key[0], "line": key[1]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                mark(key, "kept", done)
        _append(out_f, rows)  # rows first: a key is marked done only once its row is on disk
        _append(done_f, done)
        pending.clear()
        done.clear()
        write_meta()
        bar.set_postfix(kept=totals["kept"], dropped=sum(totals.values()) - totals["kept"], refresh=False)

    pending: list[tuple[Key, list[dict], str, str]] = []
    done: list[str] = []
    items = records if limit is None else islice(records, limit)
    with (
        open(out_path, "a", encoding="utf-8") as out_f,
        open(done_path, "a", encoding="utf-8") as done_f,
        tqdm(items, total=limit, desc="rejected", unit="record", disable=not progress) as bar,
    ):
        for source, line, messages in bar:
            key = (str(source), int(line))
            if key in status:
                run["already done"] += 1
                continue
            try:
                if isinstance(messages, Exception):
                    raise messages
                prompt, chosen = split_prompt(messages, *key)
                try:
                    text = render_prompt(tokenizer, prompt)
                except Exception as e:  # a template error on this record: name it
                    raise DataError(*key, f"cannot render with the chat template: {e}") from e
            except DataError as e:
                if on_error == "raise":
                    raise
                if len(examples) < 5:
                    examples.append(str(e))
                mark(key, BAD_RECORD, done)
                continue
            status[key] = "pending"  # a key repeated in the input is processed once
            pending.append((key, prompt, chosen, text))
            if len(pending) >= batch_size:
                flush(pending, done)
        flush(pending, done)
    return write_meta()
