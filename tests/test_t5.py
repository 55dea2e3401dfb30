"""T5 encoder-decoder: the seq2seq layout, decoder inputs, learning, freezing, span corruption and the CLI."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import compose_cfg
from hydra.errors import InstantiationException
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from datamodules.sft import tokenize_pair
from lmlab.core.collate import IGNORE_INDEX, Seq2SeqCollator
from lmlab.core.models import build_model
from lmlab.infer.generation import generate_texts
from train import train

T5 = ["model=t5-tiny", "callbacks.samples.num_prompts=0"]
ALPACA = [{"role": "user", "content": "Summarize.", "input": "三加四等于七。"}, {"role": "assistant", "content": "七"}]


def digit_strings(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return sorted({"".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5))) for _ in range(n)})


def test_prompt_goes_to_the_encoder_and_the_reply_to_the_labels(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = tokenize_pair(tok, ALPACA, max_length=512, max_target_length=512)
    prompt = tok.apply_chat_template(ALPACA[:1], tokenize=False, add_generation_prompt=True)
    assert sample["input_ids"].tolist() == tok.encode(prompt, add_special_tokens=False) + [tok.eos_token_id]
    assert sample["labels"].tolist() == tok.encode("七", add_special_tokens=False) + [tok.eos_token_id]


def test_prompt_and_reply_are_truncated_separately(tiny_tokenizer):
    sample = tokenize_pair(tiny_tokenizer, ALPACA, max_length=6, max_target_length=1)
    assert len(sample["input_ids"]) == 6 and sample["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert sample["labels"].tolist() == tiny_tokenizer.encode("七", add_special_tokens=False)[:1]


def test_multi_turn_history_is_encoder_input_and_the_last_reply_the_target(tiny_tokenizer):
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "3+4?"},
        {"role": "assistant", "content": "7"},
    ]
    sample = tokenize_pair(tiny_tokenizer, chat, 512, 512)
    source = tiny_tokenizer.apply_chat_template(chat[:3], tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(sample["input_ids"][:-1]) == source
    assert tiny_tokenizer.decode(sample["labels"]) == "7" + tiny_tokenizer.eos_token


def test_collator_pads_encoder_with_pad_and_labels_with_ignore_index():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([8])},
        {"input_ids": torch.tensor([5]), "labels": torch.tensor([8, 9, 1])},
    ]
    batch = Seq2SeqCollator(pad_id=0, pad_to_multiple_of=4)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[8, -100, -100, -100], [8, 9, 1, -100]]


def test_decoder_inputs_are_the_labels_shifted_right_behind_the_start_token(tmp_path, tiny_tokenizer):
    cfg = compose_cfg(tmp_path, T5)
    model = build_model(cfg.model, tiny_tokenizer)
    assert model.config.decoder_start_token_id == tiny_tokenizer.pad_token_id  # T5's convention, from conf
    samples = [
        tokenize_pair(tiny_tokenizer, ALPACA, 512, 512),
        tokenize_pair(
            tiny_tokenizer,
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a longer reply"}],
            512,
            512,
        ),
    ]
    batch = Seq2SeqCollator(tiny_tokenizer.pad_token_id)(samples)
    seen = {}
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(ids=kwargs["input_ids"]), with_kwargs=True
    )
    model(**batch)
    labels = batch["labels"]
    start = torch.full((2, 1), tiny_tokenizer.pad_token_id)
    expected = torch.cat([start, labels[:, :-1]], dim=1).masked_fill(
        torch.cat([start, labels[:, :-1]], dim=1) == IGNORE_INDEX, tiny_tokenizer.pad_token_id
    )
    assert torch.equal(seen["ids"], expected)


@pytest.mark.slow
def test_tiny_t5_learns_to_reverse_digit_strings(tmp_path):
    strings = digit_strings()
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps({"prompt": s, "response": s[::-1]}) + "\n" for s in strings))
    train(
        compose_cfg(
            tmp_path / "run",
            [
                *T5,
                "stage=sft",
                f"data.train_files=[{data}]",
                f"data.val_files=[{data}]",
                "max_steps=600",
                "batch_size=32",
                "lr=3e-3",
                "min_lr=1e-4",
                "warmup_steps=20",
                "trainer.val_check_interval=600",
            ],
        )
    )
    hf = tmp_path / "run" / "hf"
    tok, model = AutoTokenizer.from_pretrained(hf), AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
        for s in strings
    ]
    replies = generate_texts(model, tok, prompts, {"max_new_tokens": 8, "do_sample": False}, batch_size=128)
    score = sum(r == s[::-1] for r, s in zip(replies, strings, strict=True)) / len(strings)
    assert score >= 0.9, f"exact match {score:.2f} on reversing {len(strings)} digit strings"


@pytest.mark.slow
def test_frozen_encoder_and_embeddings_stay_bit_identical(tmp_path):
    first = tmp_path / "first"
    train(compose_cfg(first, [*T5, "stage=sft", "max_steps=5"]))
    train(
        compose_cfg(
            tmp_path / "second",
            [*T5, "stage=sft", f"init_from={first}", "max_steps=5", "stage.module.freeze=[embeddings,encoder]"],
        )
    )
    before = load_file(first / "hf" / "model.safetensors")
    after = load_file(tmp_path / "second" / "hf" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "shared."))]
    trained = [k for k in before if k.startswith("decoder.") and "embed_tokens" not in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith(".weight"))


def test_freezing_the_encoder_of_a_causal_model_is_an_error(tmp_path):
    with pytest.raises(InstantiationException, match="LlamaForCausalLM has no encoder"):
        train(compose_cfg(tmp_path, ["stage=sft", "max_steps=1", "stage.module.freeze=[encoder]"]))


@pytest.mark.slow
def test_span_corruption_pretraining_lowers_the_loss(tmp_path):
    text = tmp_path / "rep.txt"
    text.write_text("\n".join(["the cat sat on the mat and the dog sat on the log."] * 400))
    train(
        compose_cfg(
            tmp_path / "run",
            [*T5, f"data.train_files=[{text}]", "max_steps=60", "lr=1e-2", "trainer.log_every_n_steps=1"],
        )
    )
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses[-1] < losses[0] / 2, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert "<extra_id_99>" in AutoTokenizer.from_pretrained(tmp_path / "run" / "hf").get_vocab()


def test_init_from_a_t5_run_needs_a_seq2seq_model_preset(tmp_path):
    first = tmp_path / "first"
    train(compose_cfg(first, [*T5, "stage=sft", "max_steps=2"]))
    with pytest.raises(ValueError, match="is a seq2seq model .* choose a seq2seq model preset"):
        train(compose_cfg(tmp_path / "second", ["stage=sft", f"init_from={first}", "max_steps=2"]))


def test_validation_logs_rouge_and_samples_with_references(tmp_path):
    train(
        compose_cfg(
            tmp_path,
            [
                "model=t5-tiny",
                "stage=sft",
                "max_steps=10",
                "trainer.val_check_interval=10",
                "callbacks.samples.num_prompts=3",
            ],
        )
    )
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["reference"] and "output" in s for s in samples)
    (rouge,) = [json.loads(line) for line in (tmp_path / "rouge.jsonl").read_text().splitlines()]
    assert rouge["segmentation"] == "char" and rouge["n"] == 3
    with open(tmp_path / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("val/rouge1")]
    assert float(logged[-1]["val/rougeL"]) == pytest.approx(rouge["rougeL"])


@pytest.mark.slow
def test_t5_stage_sft_runs_as_typed(tmp_path):
    """`python train.py model=t5 stage=sft` (the 137M preset), cut to two steps for the test. It trains in this
    process on the config that command composes (the CLI itself is tests/test_cli.py's)."""
    run = tmp_path / "run"
    train(
        compose_cfg(
            run,
            [
                "model=t5",
                "stage=sft",
                "max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.limit_val_batches=1",
                "callbacks.samples.num_prompts=1",
            ],
        )
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "hf")
    assert model.config.d_model == 768 and model.config.num_layers == 8
    assert (run / "samples.jsonl").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
