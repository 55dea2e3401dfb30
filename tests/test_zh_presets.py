"""The Chinese chat, preference and summarization presets (../shared/data, added 2026-11-30) and mixture weights.

Every preset loads a first batch with every row labelled, and nothing is lost unannounced: the records read are
the file's, minus exactly the bad ones the preset's comment names. Mixture weights set each source's share of an
epoch; identity placeholders are filled. Tests of the shared files skip where ../shared/data is absent; the
weighting itself is also tested on small files written here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, tiny_bpe
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from datamodules.sft import SFTDataModule
from datamodules.sources import parse_sources
from lmlab.core.collate import IGNORE_INDEX
from train import connect_data

# preset: (stage, records in its train and val files, bad records it skips and counts)
PRESETS = {
    "zh_belle": ("sft", 998, 0),
    "zh_medical": ("sft", 1000, 0),
    "zh_identity": ("sft", 91, 0),
    "zh_glaive_toolcall": ("sft", 300, 159),  # the chats with function_call / observation turns
    "zh_sharegpt": ("sft", 998, 2),  # one record with empty turns, one without a gpt turn
    "zh_kdconv": ("sft", 900, 0),
    "zh_crosswoz": ("sft", 1000, 0),
    "zh_dpo_extra": ("dpo", 224, 0),
    "zh_dpo_mix": ("dpo", 500 + 224, 0),
    "csl_title": ("sft", 11783 + 1000, 0),  # + the shared CSL dev set as validation
    "lcsts_plus": ("sft", 8666 + 650 + 1000, 0),  # LCSTS train + PART_III, LCSTS val
    "zh_summaries": ("sft", 11783 + 8666 + 650 + 1000, 0),  # CSL titles + lcsts_plus's training pairs, CSL dev
    "zh_chat_sft": ("sft", None, 6),  # weighted (see below); Chinese Alpaca's 4 empty outputs + ShareGPT's 2
}


@pytest.fixture(scope="module")
def char_tokenizer():
    """Char level: about a token per character (unk for most Chinese ones), so the big sets tokenize quickly."""
    return tiny_bpe("char")


def preset_module(preset: str, tokenizer, *overrides: str) -> SFTDataModule:
    """The preset's datamodule as train.py builds it (tiny settings), or a skip when its files are absent."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"stage={PRESETS[preset][0]}", f"data={preset}", "seq_len=256", "batch_size=4", *overrides],
        )
    files = OmegaConf.to_container(cfg.data, resolve=True)
    missing = [
        s.path for s in parse_sources(files["train_files"] + (files["val_files"] or [])) if not os.path.exists(s.path)
    ]
    if missing:
        pytest.skip(f"{missing[0]} is absent (../shared/data is not beside this checkout)")
    dm = instantiate(cfg.data)
    connect_data(cfg, dm, tokenizer)
    return dm


@pytest.fixture(scope="module")
def mixture(char_tokenizer) -> SFTDataModule:
    dm = preset_module("zh_chat_sft", char_tokenizer)
    dm.setup()
    return dm


def assert_first_batch(batch: dict, preset: str) -> None:
    rows = 8 if PRESETS[preset][0] == "dpo" else 4  # dpo: chosen and rejected rows
    assert batch["input_ids"].shape[0] == rows and batch["input_ids"].shape[1] <= 256
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()  # every row has an answer to learn


@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p != "zh_chat_sft"))
def test_preset_loads_a_first_batch_and_loses_nothing_unannounced(preset, char_tokenizer):
    """Every record is read and adapted (the counts); the first 32 training examples are tokenized and batched by
    the datamodule's own code (tokenizing all of them is what the mixture test below does, at length)."""
    dm = preset_module(preset, char_tokenizer)
    _, records, bad = PRESETS[preset]
    assert sum(len(split) for split in dm.split()) == records - bad
    assert dm.skips.skipped.get("bad records", 0) == bad
    first = dm._tokenize_all(dm.examples()[0][:32])
    assert_first_batch(next(iter(dm._loader(first, shuffle=False))), preset)


@pytest.mark.slow
def test_mixture_loads_a_first_batch(mixture):
    assert_first_batch(next(iter(mixture.train_dataloader())), "zh_chat_sft")
    assert len(mixture.val_set) > 400
    assert mixture.skips.skipped.get("bad records", 0) == PRESETS["zh_chat_sft"][2]


@pytest.mark.slow
def test_mixture_weights_set_each_sources_share(mixture):
    """A source's records (those not held out) go into the epoch `weight` times: whole repeats, then a seeded
    subsample for a fraction."""
    train, val = mixture.split()
    weights = {source.label: source.weight for source in mixture.sources}
    assert weights == {"zh_alpaca": 1, "belle": 1, "sharegpt": 1, "kdconv": 0.5, "crosswoz": 0.5, "identity": 3}
    for source in mixture.sources:
        path = str(Path(source.path))
        kept = len(mixture._read([source])) - sum(1 for s, _, _ in val if s == path)
        fraction = source.weight - int(source.weight)
        assert sum(1 for s, _, _ in train if s == path) == int(source.weight) * kept + round(fraction * kept)
    # the held-out validation has Chinese Alpaca rows (about val_fraction of them), and none of them is trained on
    alpaca = str(Path(mixture.sources[0].path))
    held = {line for s, line, _ in val if s == alpaca}
    assert 0.03 * 4996 < len(held) < 0.07 * 4996
    assert not held & {line for s, line, _ in train if s == alpaca}


@pytest.mark.slow
def test_mixture_fills_the_identity_placeholders(mixture):
    identity = str(Path(mixture.sources[-1].path))
    replies = [
        m["content"]
        for s, _, messages in mixture.split()[0]
        if s == identity
        for m in messages
        if m["role"] == "assistant"
    ]
    assert len(replies) > 200 and all("{{" not in r for r in replies)
    assert sum("小林" in r for r in replies) > 100 and sum("lmlab" in r for r in replies) > 100


def test_identity_name_comes_from_the_command_line(char_tokenizer):
    dm = preset_module("zh_identity", char_tokenizer, '+identity_name="小明"', "+identity_author=THU")
    text = json.dumps([messages for split in dm.split() for _, _, messages in split], ensure_ascii=False)
    assert "小明" in text and "THU" in text and "小林" not in text and "{{" not in text


def test_glaive_skips_exactly_the_tool_call_chats(char_tokenizer):
    dm = preset_module("zh_glaive_toolcall", char_tokenizer)
    dm.split()
    assert dm.skips.skipped == {"bad records": 159}
    assert all("unknown role 'function_call'" in e or "unknown role 'observation'" in e for e in dm.skips.first_errors)


def test_csl_title_validates_on_the_disjoint_csl_dev_set(char_tokenizer):
    dm = preset_module("csl_title", char_tokenizer)
    train, val = dm.split()
    assert len(val) == 1000 and all(source.endswith("zh_summarization_csl/dev.tsv") for source, _, _ in val)
    # the abstract is the prompt and the title the reply, in both files (not the dev file's "to title" column)
    assert all(len(m) == 2 and len(m[0]["content"]) > 50 for _, _, m in val[:20])
    assert not {m[0]["content"] for _, _, m in val} & {m[0]["content"] for _, _, m in train}


# --- weighting, on files written here ---------------------------------------------------------------------------


def write_pairs(path: Path, n: int, tag: str) -> str:
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}", "response": f"answer {i}"}) + "\n" for i in range(n)))
    return str(path)


def test_weights_repeat_and_subsample_train_records_only(tmp_path):
    a, b = write_pairs(tmp_path / "a.jsonl", 10, "a"), write_pairs(tmp_path / "b.jsonl", 40, "b")
    val = write_pairs(tmp_path / "val.jsonl", 5, "v")
    train_files = [{"path": a, "weight": 3}, {"path": b, "weight": 0.25}]

    def prompts(seed: int) -> list[str]:
        dm = SFTDataModule(train_files=train_files, val_files=[val], split_seed=seed)
        assert len(dm.split()[1]) == 5  # validation is read once, never weighted
        return [messages[0]["content"] for _, _, messages in dm.split()[0]]

    taken = prompts(seed=0)
    assert sum(p.startswith("a") for p in taken) == 30 and sum(p.startswith("b") for p in taken) == 10
    assert len({p for p in taken if p.startswith("b")}) == 10  # a subsample: distinct records
    assert prompts(seed=0) == taken and prompts(seed=1) != taken  # seeded
    with pytest.raises(ValueError, match=r"data.val_files\[0\].weight: weights shape the training epoch only"):
        SFTDataModule(train_files=[a], val_files=[{"path": val, "weight": 2}]).split()


def test_held_out_records_are_never_trained_on_in_any_copy(tmp_path):
    a = write_pairs(tmp_path / "a.jsonl", 100, "a")
    dm = SFTDataModule(train_files=[{"path": a, "weight": 2}], val_fraction=0.1)
    train, val = dm.split()
    assert len(val) == 10 and len(train) == 180
    assert not {line for _, line, _ in val} & {line for _, line, _ in train}
