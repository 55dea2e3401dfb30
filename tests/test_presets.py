"""Every data preset for ../shared/data resolves and yields a first batch (skipped where the data is absent)."""

from __future__ import annotations

import os

import pytest
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from datamodules.sources import parse_sources
from lmlab.core.collate import IGNORE_INDEX
from train import connect_data

PRESETS = {  # preset: the stage that reads it today
    "alpaca_en": "sft",
    "zh_alpaca": "sft",
    "lcsts": "sft",
    "csl": "sft",
    "dpo_en": "dpo",
    "zh_dpo": "dpo",
    "oasst_zh": "dpo",
    "zh_wiki": "pretrain",
    "cluecorpus": "pretrain",
    "zh_novels": "pretrain",
    "tinyshakespeare": "pretrain",
    "sms_spam": "classify",
    "sms_spam_text": "pretrain",
}


SEQ2SEQ = ["lcsts", "csl"]  # summarization presets, as T5 reads them (text -> encoder, summary -> labels)


@pytest.mark.parametrize(
    "preset, model", [(p, "llama-tiny") for p in sorted(PRESETS)] + [(p, "t5-tiny") for p in SEQ2SEQ]
)
@pytest.mark.slow
def test_preset_loads_a_first_batch(preset, model, tmp_path, tiny_tokenizer):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"stage={PRESETS[preset]}",
                f"data={preset}",
                f"model={model}",
                "seq_len=1024",
                "batch_size=4",
                f"paths.cache_dir={tmp_path}",
            ],
        )
    missing = [s.path for s in parse_sources(cfg.data.train_files) if not os.path.exists(s.path)]
    if missing:
        pytest.skip(f"{missing[0]} is absent (../shared/data is not beside this checkout)")
    dm = instantiate(cfg.data)
    connect_data(cfg, dm, tiny_tokenizer)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == (8 if PRESETS[preset] == "dpo" else 4)  # dpo: chosen and rejected rows
    assert (batch["labels"] != IGNORE_INDEX).any()
    if model == "t5-tiny":  # encoder inputs end with EOS; labels are the summary (its own length), then EOS
        assert (batch["input_ids"] == tiny_tokenizer.eos_token_id).sum() >= 4
        assert batch["labels"].shape[1] < batch["input_ids"].shape[1]
    assert len(dm.val_set) > 0
    # nothing is lost unannounced: zh_alpaca's 4 rows with an empty output, dpo_en's 6 pairs and oasst_zh's 3
    # ranked answers identical to the best one are the only bad records
    assert dm.skips.skipped.get("bad records", 0) == {"zh_alpaca": 4, "dpo_en": 6, "oasst_zh": 3}.get(preset, 0)


def test_every_shared_dataset_has_a_preset():
    assert SHARED_DATA.parent.name == "shared"
    presets = {p.stem for p in (REPO / "conf" / "data").glob("*.yaml")}
    assert set(PRESETS) <= presets
