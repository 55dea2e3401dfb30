"""T5 built for AdamW: tied head without HF's d_model**-0.5 output rescale, embedding drawn at 1/sqrt(d_model)."""

from __future__ import annotations

import torch
from conftest import compose_cfg
from transformers import AutoModelForSeq2SeqLM

from lmlab.core.models import build_model


def test_t5_head_is_tied_unscaled_and_starts_at_unit_logits(tmp_path, tiny_tokenizer):
    model = build_model(compose_cfg(tmp_path, ["model=t5-tiny"]).model, tiny_tokenizer)
    d = model.config.d_model
    assert model.lm_head.weight is model.shared.weight  # transformers 5 ties T5's head whatever the preset says
    assert model.config.scale_decoder_outputs is False
    assert abs(model.shared.weight.std().item() - d**-0.5) < 0.2 * d**-0.5  # HF's N(0, 1) made AdamW's head slow
    x = torch.randint(10, len(tiny_tokenizer), (4, 24))
    logits = model(input_ids=x, labels=x[:, :8].clone()).logits
    assert 0.5 < logits.std().item() < 2.0, "initial logits should be of unit scale, as with HF's rescale"


def test_t5_output_layout_survives_export(tmp_path, tiny_tokenizer):
    model = build_model(compose_cfg(tmp_path, ["model=t5-tiny"]).model, tiny_tokenizer).eval()
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.scale_decoder_outputs is False and loaded.lm_head.weight is loaded.shared.weight
    x = torch.randint(10, len(tiny_tokenizer), (2, 16))
    assert torch.allclose(
        model(input_ids=x, labels=x[:, :5].clone()).logits,
        loaded(input_ids=x, labels=x[:, :5].clone()).logits,
        atol=1e-5,
    )


def test_adamw_lowers_t5_loss_to_the_unigram_level_quickly(tmp_path, tiny_tokenizer):
    """Targets drawn from a skewed unigram distribution: 60 AdamW steps at lr 1e-3 must get the loss near its
    entropy. With HF's rescaled N(0, 1) head the same run stays far above it (AdamW moves logits ~lr*sqrt(d)/step)."""
    torch.manual_seed(0)
    model = build_model(compose_cfg(tmp_path, ["model=t5-tiny"]).model, tiny_tokenizer)
    vocab = torch.arange(10, 60)
    probs = torch.softmax(-0.15 * torch.arange(len(vocab), dtype=torch.float), 0)
    entropy = -(probs * probs.log()).sum().item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(60):
        labels = vocab[torch.multinomial(probs, 16 * 12, replacement=True)].view(16, 12)
        loss = model(input_ids=torch.randint(10, 60, (16, 20)), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < entropy + 0.5, f"loss {loss.item():.2f} vs unigram entropy {entropy:.2f}"
