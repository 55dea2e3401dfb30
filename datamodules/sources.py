"""Data sources of a mixture: which files, how much of each, under what name.

A datamodule's ``train_files`` entries are plain paths (weight 1, named by the file) or mappings::

    train_files:
      - ${paths.data_dir}/zh_wiki_sampled/zhwiki_sampled.txt
      - {path: ${paths.data_dir}/zh_laws_cn/laws.jsonl.xz, weight: 0.2, name: laws}
      - {path: .../identity.json, weight: 3, fill: {"{{name}}": 小林, "{{author}}": lmlab}}

``weight`` is how many times a source's records go into one epoch: 2 repeats every record twice, 0.25
keeps a seeded quarter of them, so a mixture says plainly how much of each source the model sees.
``format`` overrides ``data.format`` for that file (a TSV beside JSON files); ``fill`` replaces
placeholder strings in every text field of its records (self-cognition templates).
:func:`adapted_records` reads a list of sources that way, for the datamodules and generate.py alike.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from datamodules.formats import DataError, SkipCounter, adapt, read_records

T = TypeVar("T")
KEYS = {"path", "weight", "name", "format", "fill"}


@dataclass(frozen=True)
class Source:
    """One file of a mixture (see the module docstring)."""

    path: str
    weight: float = 1.0
    name: str = ""
    format: Any = None
    fill: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name used in logs and per-source metrics: ``name``, else the file name without its suffixes."""
        return self.name or Path(self.path).name.split(".")[0]


def parse_sources(entries: Sequence[str | Mapping[str, Any]]) -> list[Source]:
    """``train_files`` entries as Sources; a bad entry names its position and key."""
    sources = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            sources.append(Source(entry))
            continue
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise ValueError(f"data.train_files[{i}]: expected a path or a mapping with 'path', got {entry!r}")
        unknown = set(entry) - KEYS
        if unknown:
            raise ValueError(f"data.train_files[{i}]: unknown keys {sorted(unknown)}; expected some of {sorted(KEYS)}")
        weight = float(entry.get("weight", 1.0))
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"data.train_files[{i}].weight: expected a number > 0, got {entry.get('weight')!r}")
        sources.append(
            Source(
                str(entry["path"]),
                weight,
                str(entry.get("name") or ""),
                entry.get("format"),
                dict(entry.get("fill") or {}),
            )
        )
    labels = [s.label for s in sources]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"data.train_files: sources share the names {repeated}; give them distinct 'name's")
    return sources


def weighted(items: Sequence[T], weight: float, seed: int) -> list[T]:
    """``items`` taken ``weight`` times: whole repeats, then a seeded sample for the fraction, order kept."""
    whole, fraction = int(weight), weight - int(weight)
    out = list(items) * whole
    if fraction:
        keep = sorted(random.Random(seed).sample(range(len(items)), round(fraction * len(items))))
        out += [items[i] for i in keep]
    return out


def fill_placeholders(record: Any, fill: Mapping[str, str]) -> Any:
    """``record`` with every placeholder of ``fill`` replaced in its strings, nested lists and dicts included."""
    if not fill:
        return record
    if isinstance(record, str):
        for key, value in fill.items():
            record = record.replace(key, value)
        return record
    if isinstance(record, list):
        return [fill_placeholders(x, fill) for x in record]
    if isinstance(record, dict):
        return {k: fill_placeholders(v, fill) for k, v in record.items()}
    return record


def adapted_records(
    sources: Sequence[str | Source],
    fmt: str | Mapping[str, Any],
    adapter: Callable[[Any, str, int], T],
    skips: SkipCounter | None = None,
    ignored: Counter | None = None,
) -> Iterator[tuple[str, int, T | DataError]]:
    """(source, line, adapted record) for every record of ``sources``, or (source, line, DataError) for a record
    the adapter rejects: the caller raises it or counts it.

    ``sources`` are paths or Sources: each file is read in its own ``format`` (else ``fmt``, the preset's
    ``data.format``) and its placeholders are filled (``fill``) before ``adapter(record, source, line)``
    (:func:`datamodules.formats.to_messages` and the like) sees the record. A line that cannot be read raises
    its DataError, or, when ``skips`` is given, is counted there and passed over (:func:`read_records`).
    A field the adapter looked for and missed while a near miss of it is there is a misspelling, rejected like
    any bad record; other fields it never read are counted in ``ignored`` (field name -> records) when given
    (:func:`datamodules.formats.adapt`).
    """
    for entry in sources:
        spec = entry if isinstance(entry, Source) else Source(entry)
        for source, line, record in read_records(spec.path, spec.format or fmt, skips=skips):
            try:
                adapted, unread = adapt(adapter, fill_placeholders(record, spec.fill), source, line)
            except DataError as e:
                yield source, line, e
                continue
            if ignored is not None:
                ignored.update(unread)
            yield source, line, adapted
