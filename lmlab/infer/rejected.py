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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.formats import DataError, SkipCounter
from lmlab.core.tokenizer import render_prompt
from lmlab.infer.generation import generate_texts

Key = tuple[str, int]
Pending = tuple[Key, list[dict], str, str]  # (key, prompt turns, chosen answer, rendered prompt)
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


@dataclass(frozen=True)
class RejectedSettings:
    """How :func:`build_rejected` batches records and judges samples: conf/generate.yaml's keys of the same names.

    - ``batch_size``: prompts per :func:`lmlab.infer.generation.generate_texts` call; each batch's rows are
      written (and its records marked done) together;
    - ``similarity_threshold``: a sample whose difflib ratio to the dataset answer is >= this is dropped as
      ``too_similar`` (:func:`too_similar`);
    - ``degenerate``: keyword arguments of :func:`degenerate` (``ngram_sizes``, ``max_ngram_share``,
      ``min_repeats``); empty: its defaults. Kept as a read-only mapping;
    - ``limit``: only the first ``limit`` records of the input are looked at, those already done included
      (None: all);
    - ``on_error``: ``raise`` stops at a bad record, ``skip`` counts it as ``bad record`` and goes on.
    """

    batch_size: int = 8
    similarity_threshold: float = 0.9
    degenerate: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None
    on_error: str = "raise"

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={self.on_error!r}: choose raise or skip")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")
        object.__setattr__(self, "degenerate", MappingProxyType(dict(self.degenerate or {})))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RejectedSettings:
        """The settings of a composed conf/generate.yaml (a DictConfig or any mapping with these keys)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


def verdict(sample: str, chosen: str, settings: RejectedSettings) -> str:
    """``kept``, or why ``sample`` is dropped as the rejected answer to a prompt whose chosen answer is ``chosen``:
    ``degenerate: <reason>`` (:func:`degenerate`) or ``too_similar`` (:func:`too_similar`)."""
    reason = degenerate(sample, **settings.degenerate)
    if reason is not None:
        return f"degenerate: {reason}"
    if too_similar(sample, chosen, settings.similarity_threshold):
        return TOO_SIMILAR
    return "kept"


class _Ledger:
    """What has been processed into ``out_path`` and how, and the three files that keep it.

    ``status`` maps each processed record's key to ``kept`` or its drop reason (``pending`` while its batch is
    being sampled); ``totals`` counts the statuses over the whole file, ``run`` this run's (with ``already done``),
    ``examples`` holds this run's first bad records' errors. :meth:`mark` queues a record's done-key and
    :meth:`commit` writes a batch: its rows to ``out_path``, then the queued keys to ``<out>.done``, then the
    counts to ``<out>.meta.json``. A context manager: the two jsonl files stay open for appending inside it.
    """

    def __init__(self, out_path: Path, skips: SkipCounter | None, info: Mapping[str, Any] | None):
        self.out_path = out_path
        self.done_path = out_path.with_name(out_path.name + ".done")
        self.meta_path = out_path.with_name(out_path.name + ".meta.json")
        self.skips, self.info = skips, info
        self.status = load_progress(out_path, self.done_path)
        self.totals = Counter(self.status.values())
        self.run: Counter = Counter()
        self.examples: list[str] = []  # the first bad records' errors, for the meta
        self._done: list[str] = []  # done-keys waiting for the next commit

    def __enter__(self) -> _Ledger:
        with ExitStack() as stack:
            self._out_f = stack.enter_context(open(self.out_path, "a", encoding="utf-8"))
            self._done_f = stack.enter_context(open(self.done_path, "a", encoding="utf-8"))
            self._files = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()

    def mark(self, key: Key, outcome: str) -> None:
        """Count a record's outcome (kept or a drop reason) and queue its done-key."""
        self.status[key] = outcome
        self.totals[outcome] += 1
        self.run[outcome] += 1
        self._done.append(json.dumps({"source": key[0], "line": key[1], "status": outcome}, ensure_ascii=False) + "\n")

    def bad(self, key: Key, error: DataError) -> None:
        """A record that cannot be made a pair (``on_error=skip``): kept among the examples, marked ``bad record``."""
        if len(self.examples) < 5:
            self.examples.append(str(error))
        self.mark(key, BAD_RECORD)

    def commit(self, rows: list[str]) -> None:
        """Write a batch: rows first, since a key is marked done only once its row is on disk; then the meta."""
        _append(self._out_f, rows)
        _append(self._done_f, self._done)
        self._done.clear()
        self.write_meta()

    def write_meta(self) -> dict[str, Any]:
        """The counts, written to ``<out>.meta.json`` and returned (see :func:`build_rejected`)."""
        this_run = {
            **_split(self.run),
            "already_done": self.run["already done"],
            "bad_record_examples": self.examples,
        }
        meta = {
            **_split(self.totals),
            "this_run": this_run,
            "unreadable_lines": self.skips.total if self.skips is not None else 0,
            "out": str(self.out_path),
            **(self.info or {}),
        }
        self.meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return meta


def _split(counts: Counter) -> dict[str, Any]:
    """Outcome counts as ``kept``, ``dropped`` by reason and their ``total`` (``already done`` is neither)."""
    dropped = {k: v for k, v in sorted(counts.items()) if k not in ("kept", "already done")}
    return {"kept": counts["kept"], "dropped": dropped, "total": counts["kept"] + sum(dropped.values())}


def _prompts(
    records: Iterable[tuple[str, int, Any]],
    tokenizer: PreTrainedTokenizerBase,
    settings: RejectedSettings,
    ledger: _Ledger,
) -> Iterator[Pending]:
    """The records still to sample, with their prompts rendered. A record already in ``ledger`` is counted as
    ``already done``; a bad one raises its DataError or (``on_error=skip``) is marked ``bad record``."""
    for source, line, messages in records:
        key = (str(source), int(line))
        if key in ledger.status:
            ledger.run["already done"] += 1
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
            if settings.on_error == "raise":
                raise
            ledger.bad(key, e)
            continue
        ledger.status[key] = "pending"  # a key repeated in the input is processed once
        yield key, prompt, chosen, text


def _batches(items: Iterable[Pending], size: int) -> Iterator[list[Pending]]:
    """``items`` in lists of ``size``, each as soon as it is full, then the rest: a last list, empty or not,
    always comes, so the done-keys of bad records after the last full batch are committed too."""
    batch: list[Pending] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    yield batch


def _sample_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Pending],
    generation: Mapping[str, Any],
    settings: RejectedSettings,
    ledger: _Ledger,
) -> None:
    """Sample a reply to every prompt of ``batch``, judge it (:func:`verdict`) and commit the batch to ``ledger``."""
    prompts = [text for *_, text in batch]
    samples = generate_texts(model, tokenizer, prompts, generation, settings.batch_size) if batch else []
    rows = []
    for (key, prompt, chosen, _), sample in zip(batch, samples, strict=True):
        outcome = verdict(sample, chosen, settings)
        if outcome == "kept":
            row = {"messages": prompt, "chosen": chosen, "rejected": sample, "source": key[0], "line": key[1]}
            rows.append(json.dumps(row, ensure_ascii=False) + "\n")
        ledger.mark(key, outcome)
    ledger.commit(rows)


def build_rejected(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Iterable[tuple[str, int, Any]],
    out_path: str | Path,
    generation: Mapping[str, Any],
    settings: RejectedSettings | None = None,
    *,
    skips: SkipCounter | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (prompt, chosen = dataset answer, rejected = the model's sample) rows to ``out_path``; return the counts.

    ``records`` yields ``(source, line, messages)`` (chat messages whose last assistant turn is the
    dataset answer, as :func:`datamodules.formats.to_messages` makes them), or ``(source, line, error)``
    with the DataError of a record that could not be adapted (generate.py's ``conversations``). Samples
    come from :func:`lmlab.infer.generation.generate_texts` with ``generation`` (conf/generation);
    ``settings`` (None: the defaults) says how many records are looked at, how many prompts go to one
    generate call, which samples are dropped and what a bad record does. Records already in ``out_path``
    or its ``.done`` sidecar are passed over, so rerunning the same command resumes. ``skips`` (the
    reader's counter of unreadable lines) and ``info`` (e.g. the settings used) are reported in
    ``<out>.meta.json``, which also holds the returned counts: ``kept``, ``dropped`` by reason, ``total``
    over the whole file and ``this_run``. ``progress``: show a progress bar.
    """
    settings = settings if settings is not None else RejectedSettings()
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template to render prompts with; use an SFT run's export")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    items = records if settings.limit is None else islice(records, settings.limit)
    with (
        _Ledger(out_path, skips, info) as ledger,
        tqdm(items, total=settings.limit, desc="rejected", unit="record", disable=not progress) as bar,
    ):
        for batch in _batches(_prompts(bar, tokenizer, settings, ledger), settings.batch_size):
            _sample_batch(model, tokenizer, batch, generation, settings, ledger)
            kept = ledger.totals["kept"]
            bar.set_postfix(kept=kept, dropped=sum(ledger.totals.values()) - kept, refresh=False)
    return ledger.write_meta()
