"""A weighted pretraining mixture: weights set document and token counts, exact duplicates go (counted), OpenCC
converts, every source keeps a validation slice whose loss is logged next to val/loss, and the shared presets load."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import opencc
import pytest
from conftest import REPO, SHARED_DATA, compose_cfg, connect
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_pretrain_shards import decoded_docs

import datamodules.sources
from datamodules.pretrain import PretrainDataModule
from lmlab.core.tokenizer import train_bpe
from train import connect_data, train

ENGLISH = [f"note {i}: the cat sat on the mat and looked at bird number {i}." for i in range(80)]
CHINESE = [f"第{i}条：三加四等于七，今天天气很好，我们去公园散步。" for i in range(80)]
NEW_PRESETS = ["zh_laws", "zh_classical_modern", "zh_poetry", "zh_news", "zh_pretrain_mix"]


def write(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


def mixture(tmp_path: Path, tokenizer, entries: list[dict], **kwargs) -> PretrainDataModule:
    """A prepared datamodule over ``entries`` (train_files mappings), its cache under ``tmp_path``."""
    dm = PretrainDataModule(
        train_files=entries,
        cache_dir=str(tmp_path / "cache"),
        **{"val_fraction": 0.2, "shard_mb": 0.0005, **kwargs},
    )
    connect(dm, tokenizer, max_length=8)
    dm.prepare_data()
    return dm


def meta(dm: PretrainDataModule) -> dict:
    return json.loads((dm.token_dir / "meta.json").read_text())


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    return write(tmp_path / "en.jsonl", ENGLISH), write(tmp_path / "zh.jsonl", CHINESE)


@pytest.mark.parametrize("weight", [2, 0.5, 2.5])
def test_weight_scales_a_sources_training_documents_and_tokens(tmp_path, sources, tiny_tokenizer, weight):
    en, zh = sources
    plain_dm = mixture(tmp_path / "plain", tiny_tokenizer, [{"path": str(en)}, {"path": str(zh)}])
    dm = mixture(tmp_path / "weighted", tiny_tokenizer, [{"path": str(en), "weight": weight}, {"path": str(zh)}])
    plain, weighted = meta(plain_dm), meta(dm)
    assert dm.token_dir.name != plain_dm.token_dir.name, "the weights are part of the cache key"
    before, after = plain["by_source"]["en"], weighted["by_source"]["en"]
    assert after["documents"]["train"] == round(weight * before["documents"]["train"])
    assert after["documents"]["val"] == before["documents"]["val"], "held-out documents count once"
    assert weighted["by_source"]["zh"] == plain["by_source"]["zh"], "the other source is untouched"
    if weight == 2:
        assert after["tokens"]["train"] == 2 * before["tokens"]["train"]
    # Whole copies of every training document, then a seeded sample of them for the fraction.
    n = before["documents"]["train"]
    copies = Counter(d for d in decoded_docs(dm, "train") if d.startswith("note"))
    assert sum(copies.values()) == round(weight * n) and len(copies) == (n if weight >= 1 else round(weight * n))
    assert set(copies.values()) <= {int(weight), int(weight) + 1} - {0}
    again = mixture(tmp_path / "again", tiny_tokenizer, [{"path": str(en), "weight": weight}, {"path": str(zh)}])
    assert decoded_docs(again, "train") == decoded_docs(dm, "train"), "seeded: the same sample every time"


def test_exact_duplicates_across_the_mixture_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    first = write(tmp_path / "first.jsonl", ENGLISH[:40])
    # The second source repeats five documents of the first (one with other whitespace) and one of its own.
    repeats = ENGLISH[:4] + [" " + ENGLISH[4].replace(" ", "  ") + "\n"]
    second = write(tmp_path / "second.jsonl", ENGLISH[40:60] + repeats + [ENGLISH[45]])
    entries = [{"path": str(first)}, {"path": str(second)}]
    kept = mixture(tmp_path / "dedupe", tiny_tokenizer, entries, dedupe=True)
    counts = meta(kept)
    assert counts["duplicates"] == 6
    assert counts["by_source"]["second"]["duplicates"] == 6 and counts["by_source"]["first"]["duplicates"] == 0
    assert counts["by_source"]["second"]["documents_read"] == 26
    docs = decoded_docs(kept, "train") + decoded_docs(kept, "val")
    assert sorted(docs) == sorted(ENGLISH[:60]), "each document once, in train or in val, never both"
    everything = meta(mixture(tmp_path / "all", tiny_tokenizer, entries, dedupe=False))
    assert everything["duplicates"] == 0
    assert sum(everything["documents"].values()) == sum(counts["documents"].values()) + 6
    assert kept.token_dir.name != mixture(tmp_path / "all", tiny_tokenizer, entries).token_dir.name


def test_traditional_script_is_converted_before_duplicates_are_found(tmp_path, tiny_tokenizer):
    simplified = ["汉字转换很简单。", "国际化与本地化。", "床前明月光，疑是地上霜。"]
    traditional = write(tmp_path / "tang.jsonl", ["漢字轉換很簡單。", "國際化與本地化。"] + ENGLISH[:20])
    modern = write(tmp_path / "modern.jsonl", simplified + ENGLISH[20:40])
    dm = mixture(
        tmp_path / "t2s",
        tiny_tokenizer,
        [{"path": str(traditional)}, {"path": str(modern)}],
        dedupe=True,
        convert="t2s",
        val_fraction=0.0,
    )
    assert decoded_docs(dm, "train")[:2] == simplified[:2]
    assert meta(dm)["duplicates"] == 2 and meta(dm)["convert"].startswith("t2s (opencc ")
    assert next(dm.iter_texts()) == simplified[0], "the tokenizer reads the converted text too"
    with pytest.raises(ValueError, match=r"data.convert='t2x': not an OpenCC configuration"):
        PretrainDataModule(train_files=[str(traditional)], convert="t2x")


def test_tokenizer_text_interleaves_the_sources_by_their_weighted_size(tmp_path, sources):
    en, zh = sources
    dm = PretrainDataModule(train_files=[{"path": str(en), "weight": 3}, {"path": str(zh)}], val_fraction=0.0)
    texts = list(dm.iter_texts())
    assert len(texts) == 4 * 80
    assert Counter(texts) == Counter({**dict.fromkeys(ENGLISH, 3), **dict.fromkeys(CHINESE, 1)})
    en_bytes, zh_bytes = (sum(len(d.encode()) for d in docs) for docs in (ENGLISH, CHINESE))
    for prefix in (texts[:50], texts[:150]):  # bpe.max_bytes may stop the stream anywhere: each prefix is the mixture
        english = sum(len(t.encode()) for t in prefix if t.startswith("note")) / sum(len(t.encode()) for t in prefix)
        assert english == pytest.approx(3 * en_bytes / (3 * en_bytes + zh_bytes), abs=0.03)


def test_each_source_reports_its_own_val_loss_next_to_the_token_weighted_val_loss(tmp_path, sources):
    en, zh = sources
    entries = f"[{{path: '{en}', name: english, weight: 2}}, {{path: '{zh}', name: chinese}}]"
    cfg = compose_cfg(
        tmp_path,
        [
            f"data.train_files={entries}",
            "data.val_fraction=0.25",
            "++data.val_per_source=true",
            "++data.dedupe=true",
            "max_steps=6",
            "trainer.val_check_interval=3",
            "callbacks.samples.num_prompts=0",
        ],
    )
    train(cfg)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(rows) == 2
    counts = json.loads(next(Path(cfg.paths.cache_dir).rglob("meta.json")).read_text())["by_source"]
    limit = cfg.trainer.limit_val_batches * cfg.batch_size  # windows read from each source's loader
    tokens = {name: min((c["tokens"]["val"] - 1) // cfg.seq_len, limit) * cfg.seq_len for name, c in counts.items()}
    for row in rows:
        losses = {name: float(row[f"val/loss/{name}"]) for name in ("english", "chinese")}
        assert float(row["val/ppl/english"]) == pytest.approx(math.exp(losses["english"]), rel=1e-4)
        mean = sum(losses[n] * tokens[n] for n in losses) / sum(tokens.values())
        assert float(row["val/loss"]) == pytest.approx(mean, rel=1e-5)
        assert losses["english"] != pytest.approx(losses["chinese"], rel=1e-3)
    assert not any("dataloader_idx" in key for key in rows[0])


def test_a_source_without_a_val_window_is_named(tmp_path, sources, tiny_tokenizer):
    en, zh = sources
    dm = mixture(
        tmp_path,
        tiny_tokenizer,
        [{"path": str(en)}, {"path": str(zh)}],
        val_per_source=True,
        val_fraction=0.002,
        split_seed=0,  # a split that holds out no zh document at this fraction
    )
    with pytest.raises(ValueError, match=r"source 'zh' holds out 0 tokens.*raise data.val_fraction"):
        dm.setup()


def test_val_files_are_the_validation_sets_by_their_names(tmp_path, sources, tiny_tokenizer):
    """A val file named like a training source (here the same file, as eval tests do) is that source's val set."""
    en, zh = sources
    dm = mixture(
        tmp_path,
        tiny_tokenizer,
        [{"path": str(en), "weight": 2}, {"path": str(zh)}],
        val_files=[str(en), str(zh)],
        val_per_source=True,
    )
    counts = meta(dm)["by_source"]
    assert counts["en"]["documents"] == {"train": 160, "val": 80} and counts["en"]["documents_read"] == 160
    assert counts["zh"]["documents"] == {"train": 80, "val": 80}
    dm.setup()
    assert list(dm.val_dataloader()) == ["en", "zh"]
    assert len(dm.val_sets["zh"]) == (counts["zh"]["tokens"]["val"] - 1) // dm.seq_len


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_shared_preset_loads_a_first_batch(preset, tmp_path, monkeypatch):
    """The real files, first 60 records of each (so the test stays quick), through the preset's own settings."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"data={preset}",
                "seq_len=64",
                "batch_size=4",
                "data.val_fraction=0.2",
                "data.num_proc=0",
                f"paths.cache_dir={tmp_path}",
            ],
        )
    entries = OmegaConf.to_container(cfg.data.train_files, resolve=True)
    paths = [entry["path"] if isinstance(entry, dict) else entry for entry in entries]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"{missing[0]} is absent ({SHARED_DATA} is not beside this checkout)")
    real = datamodules.sources.read_records  # what LMDataModule.records reads through (adapted_records)
    monkeypatch.setattr(datamodules.sources, "read_records", lambda *a, **k: itertools.islice(real(*a, **k), 60))
    dm = instantiate(cfg.data)
    tokenizer = train_bpe(dm.iter_texts(), **{**cfg.bpe, "vocab_size": 400, "max_bytes": 100_000}, total_bytes=100_000)
    connect_data(cfg, dm, tokenizer)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    by_source = meta(dm)["by_source"]
    assert all(counts["tokens"]["train"] > 0 for counts in by_source.values())
    if dm.val_per_source:
        assert list(dm.val_dataloader()) == list(by_source) and all(len(v) > 0 for v in dm.val_sets.values())
    if dm.convert:
        to_simplified = opencc.OpenCC(dm.convert)
        assert all(to_simplified.convert(t) == t for t in itertools.islice(dm.iter_texts(), 200))
