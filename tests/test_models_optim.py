"""Model presets build from config with the tokenizer's vocab; AdamW groups and the lr schedule."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from transformers import PreTrainedTokenizerFast

from lightning_modules.optim import param_groups, warmup_cosine
from lmlab.core.models import build_model, count_parameters, flops_per_token, load_model
from lmlab.core.tokenizer import load_tokenizer


def preset(name: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"model={name}"]).model


class FakeTokenizer:
    """Only what build_model reads: a vocab size and special-token ids."""

    def __init__(self, n: int):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2
        self.pad_token = "<pad>"

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<pad>": self.pad_token_id}[token]

    def __len__(self) -> int:
        return self.n


# (preset, vocab, expected parameters in millions, tolerance)
SIZES = [
    ("gpt2", 50257, 124.4, 0.5),
    ("gpt2-medium", 50257, 354.8, 1.0),
    ("llama", 6400, 246.2, 1.0),
    ("llama-43m", 64000, 43.3, 1.5),
    ("t5", 6400, 137.1, 0.5),
]


@pytest.mark.parametrize("name, vocab, millions, tol", SIZES)
def test_preset_sizes(name, vocab, millions, tol):
    with torch.device("meta"):
        model = build_model(preset(name), FakeTokenizer(vocab))
    assert model.get_input_embeddings().num_embeddings == vocab
    assert abs(count_parameters(model) / 1e6 - millions) < tol


def test_llama_preset_has_the_matelike_shape():
    cfg = preset("llama").config
    with torch.device("meta"):
        model = build_model(preset("llama"), FakeTokenizer(6400))
    assert cfg.num_hidden_layers == 8 and cfg.hidden_act == "silu"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.config.pad_token_id == 2 and model.config.eos_token_id == 1


def test_moe_preset_routes_to_experts_and_reports_aux_loss():
    model = build_model(preset("llama-moe-tiny"), FakeTokenizer(300))
    out = model(torch.randint(0, 300, (2, 8)))
    assert "Mixtral" in type(model).__name__ and out.aux_loss is not None and torch.isfinite(out.aux_loss)
    with torch.device("meta"):
        big = build_model(preset("llama-moe"), FakeTokenizer(6400))
    assert big.config.num_local_experts == 8 and big.config.num_experts_per_tok == 2


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-moe-tiny"])
def test_tiny_presets_run_forward_on_cpu(name, tiny_tokenizer: PreTrainedTokenizerFast):
    model = build_model(preset(name), tiny_tokenizer)
    ids = tiny_tokenizer("3 + 4 = 7", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tiny_tokenizer))


def test_flops_per_token_matches_the_nanogpt_count_for_gpt2():
    with torch.device("meta"):
        model = build_model(preset("gpt2"), FakeTokenizer(50257))
    n_without_wpe = count_parameters(model) - 1024 * 768
    assert flops_per_token(model, 1024) == 6 * n_without_wpe + 12 * 12 * 768 * 1024


def test_weight_decay_only_on_matrices():
    with torch.device("meta"):
        model = build_model(preset("llama-tiny"), FakeTokenizer(300))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert "model.embed_tokens.weight" in {names[id(p)] for p in no_decay["params"]}
    assert all("norm" in names[id(p)] or "embed" in names[id(p)] for p in no_decay["params"])
    with_embeddings, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert "model.embed_tokens.weight" in {names[id(p)] for p in with_embeddings["params"]}


def test_warmup_then_cosine_to_min_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)  # linear warmup
    assert lrs[60] == pytest.approx(2e-5 + (2e-4 - 2e-5) * 0.5)  # halfway down the cosine
    assert lrs[110] == pytest.approx(2e-5) and lrs[119] == pytest.approx(2e-5)  # floor at min_lr
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def test_fused_adamw_with_bf16_clips_gradients(tmp_path, monkeypatch):
    """Lightning refuses to clip for fused optimizers under mixed precision; bf16 has no scaler, so lmlab clips."""
    from conftest import compose_cfg

    from train import train

    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        total = real_clip(params, max_norm, *args, **kwargs)
        norms.append(
            (
                float(total),
                float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))),
            )
        )
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    cfg = compose_cfg(
        tmp_path,
        [
            "trainer.precision=bf16-mixed",
            "optim.optimizer.fused=true",
            "max_steps=4",
            "trainer.gradient_clip_val=0.01",
            "callbacks.samples.num_prompts=0",
        ],
    )
    train(cfg)
    assert len(norms) == 4
    assert all(before > 0.01 and after == pytest.approx(0.01, rel=1e-3) for before, after in norms)


def test_fused_auto_stays_off_on_the_cpu(tmp_path, monkeypatch):
    """conf/optim/adamw.yaml's ``fused: auto`` asks for the fused kernel only where the weights are on a GPU (the
    kernel is CUDA-only; tests/test_gpu.py trains with it)."""
    from conftest import compose_cfg

    from train import train

    built = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        built.append(kwargs.get("fused"))
        return real_adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    cfg = compose_cfg(tmp_path, ["max_steps=2", "callbacks.samples.num_prompts=0"])
    assert cfg.optim.optimizer.fused == "auto"
    train(cfg)
    assert built == [False]


@pytest.mark.slow
def test_adafactor_preset_learns(tmp_path):
    """optim=adafactor (T5's optimizer) trains the tiny model well below the uniform loss in 60 steps."""
    from conftest import compose_cfg

    from train import train

    cfg = compose_cfg(tmp_path, ["optim=adafactor", "lr=1e-2", "min_lr=1e-3", "max_steps=60"])
    val_loss = train(cfg)
    assert val_loss < math.log(len(load_tokenizer(tmp_path / "hf"))) - 0.5  # 1.0 below it on 2026-11-30


def preset_with(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"model={name}", *overrides]).model


@pytest.mark.parametrize(
    "name, key", [("llama-tiny", "attention_dropout"), ("gpt2-tiny", "attn_pdrop"), ("t5-tiny", "dropout_rate")]
)
def test_init_from_takes_the_presets_dropout(tmp_path, tiny_tokenizer, caplog, name, key):
    """``model.config.<dropout>=0.1`` with init_from: the checkpoint's 0.0 was kept without a word."""
    build_model(preset(name), tiny_tokenizer).save_pretrained(tmp_path)
    caplog.set_level(logging.INFO)
    model = load_model(tmp_path, preset_with(name, [f"++model.config.{key}=0.1"]), tiny_tokenizer)
    assert getattr(model.config, key) == 0.1
    assert f"dropout from model={name}: {{'{key}': 0.1}}" in caplog.text
    assert "keeps its own" not in caplog.text, "the same preset: nothing else differs"
    assert getattr(load_model(tmp_path, preset(name), tiny_tokenizer).config, key) == 0.0


def test_init_from_names_the_shape_it_keeps(tmp_path, tiny_tokenizer, caplog):
    """A llama-tiny checkpoint under model=llama-26m trains as the checkpoint is; the warning says so."""
    build_model(preset("llama-tiny"), tiny_tokenizer).save_pretrained(tmp_path)
    model = load_model(tmp_path, preset("llama-26m"), tiny_tokenizer)
    assert model.config.hidden_size == preset("llama-tiny").config.hidden_size
    assert "keeps its own hidden_size=" in caplog.text and "where model=llama-26m sets " in caplog.text
