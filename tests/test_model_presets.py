"""The minimind-class presets have the parameter counts their comments and the README state."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("preset, millions", [("llama-26m", 25.83), ("llama-57m", 56.83)])
def test_minimind_class_presets_have_their_stated_size(preset, millions):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}"])
    config = instantiate(cfg.model.config, vocab_size=6400, _convert_="all")
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention, as minimind
