"""Tiny models really learn: SFT to an exact-match rate a broken mask misses, also with LoRA adapters; pretraining cuts
the loss."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose_cfg
from transformers import AutoModelForCausalLM, AutoTokenizer

import datamodules.sft
from lmlab.core.collate import IGNORE_INDEX
from train import train

PAIRS = [(a, b) for a in range(10) for b in range(10)]


def write_addition_task(path) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n" for a, b in PAIRS)


def exact_match(hf_dir) -> float:
    """Share of prompts whose greedy reply is exactly the sum, followed by EOS (the model stops)."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok.padding_side = "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}="}], tokenize=False, add_generation_prompt=True)
        for a, b in PAIRS
    ]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    hits = 0
    for (a, b), row in zip(PAIRS, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
        if tok.eos_token_id in row:
            answer = tok.decode(row[: row.index(tok.eos_token_id)])
            hits += answer == str(a + b)
    return hits / len(PAIRS)


def broken(kind: str):
    """tokenize_conversation with a wrong mask: loss on the prompt only, or the EOS left unlabelled."""
    original = datamodules.sft.tokenize_conversation

    def tokenize(tokenizer, messages, max_length, train_on_prompt=False, chat_template=None):
        sample = original(tokenizer, messages, max_length, train_on_prompt, chat_template)
        ids, labels = sample["input_ids"], sample["labels"].clone()
        if kind == "prompt_only":
            labels = torch.where(labels == IGNORE_INDEX, ids, torch.full_like(ids, IGNORE_INDEX))
        elif kind == "no_eos":
            labels[labels == tokenizer.eos_token_id] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    return tokenize


@pytest.fixture(scope="module")
def addition_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    write_addition_task(path)
    return path


def sft_exact_match(run, addition_file, *overrides: str) -> float:
    """The exact match of an SFT run on the addition task (400 steps unless ``overrides`` say otherwise)."""
    cfg = compose_cfg(
        run,
        [
            "stage=sft",
            f"data.train_files=[{addition_file}]",
            f"data.val_files=[{addition_file}]",
            "max_steps=400",
            "batch_size=20",
            "lr=5e-3",
            "min_lr=5e-4",
            "warmup_steps=10",
            "trainer.val_check_interval=400",
            "callbacks.samples.num_prompts=0",
            *overrides,
        ],
    )
    train(cfg)
    return exact_match(run / "hf")


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["correct", "prompt_only", "no_eos"])
def test_sft_learns_addition_only_with_the_right_mask(tmp_path, addition_file, monkeypatch, mask):
    if mask != "correct":
        monkeypatch.setattr(datamodules.sft, "tokenize_conversation", broken(mask))
    score = sft_exact_match(tmp_path, addition_file)
    if mask == "correct":
        assert score >= 0.8, f"exact match {score:.2f} after SFT"
    else:
        assert score <= 0.2, f"a broken mask ({mask}) should not reach exact match, got {score:.2f}"


@pytest.mark.slow
def test_lora_sft_learns_addition(tmp_path, addition_file):
    """LoRA adapters alone (peft=lora) take a model that has barely started SFT (60 full-weight steps: exact match
    0.11-0.12 on 5 seeds) to 0.90-1.00 in 300 steps (5 seeds); the adapters' dropout is off, which on these 100
    examples only slowed the short run (0.84-0.92 with conf/peft/lora.yaml's 0.05)."""
    start = tmp_path / "start"
    before = sft_exact_match(start, addition_file, "max_steps=60", "trainer.val_check_interval=60")
    after = sft_exact_match(
        tmp_path / "lora",
        addition_file,
        f"init_from={start}",
        "peft=lora",
        "peft.lora_dropout=0",
        "max_steps=300",
        "trainer.val_check_interval=300",
    )
    assert before <= 0.3, f"the starting model should barely add: exact match {before:.2f}"
    assert after >= 0.6 and after - before >= 0.4, f"exact match {before:.2f} -> {after:.2f} with LoRA"


def test_pretraining_on_repetitive_text_halves_the_loss(tmp_path):
    text = tmp_path / "rep.txt"
    text.write_text("\n".join(["the cat sat on the mat and the dog sat on the log."] * 400))
    cfg = compose_cfg(
        tmp_path / "run", [f"data.train_files=[{text}]", "max_steps=40", "lr=1e-2", "trainer.log_every_n_steps=1"]
    )
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses[-1] < losses[0] / 2, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
