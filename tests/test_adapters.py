"""peft=lora (issue 17, item 1): only the adapters train (and a classifier's head) and the base stays bit-identical;
hf/ holds the merged model, whose logits equal the adapted model's; DPO's reference is the policy with its adapters off
(no second model), and DPO with adapters learns; T5 too; a classifier with adapters learns; FLOPs count the gradient
through the frozen layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from peft import PeftModel
from safetensors.torch import load_file
from test_dpo import DPO, column, metrics
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from lightning_modules.dpo import AdaptersOff, DPOModule, build_reference
from lightning_modules.lm import lm_forward
from lmlab.core.adapters import add_adapters
from lmlab.core.models import build_model, count_parameters, flops_per_batch, flops_per_token
from train import train

QUIET = ["callbacks.samples.num_prompts=0", "trainer.val_check_interval=4", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A pretrained llama-tiny run to put adapters on."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(compose_cfg(run, ["max_steps=4", *QUIET]))
    return run


def test_lora_sft_trains_only_the_adapters_and_exports_the_merged_model(tmp_path, base):
    run = tmp_path / "sft"
    train(compose_cfg(run, ["stage=sft", f"init_from={base}", "peft=lora", "max_steps=8", "lr=1e-2", *QUIET]))
    start = load_file(base / "hf" / "model.safetensors")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "the adapters trained"
    prefix = "model.base_model.model."
    frozen = {k.removeprefix(prefix).replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert frozen.keys() >= start.keys()
    for name, weights in start.items():
        assert torch.equal(frozen[name], weights), f"{name}: the base changed"
    # the merged export and the base with the saved adapters give the same logits
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    ids = tokenizer("Alice has 3 apples. 三加四等于七。", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "hf"), run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(**ids).logits, AutoModelForCausalLM.from_pretrained(base / "hf")(**ids).logits)


def test_dpo_reference_is_the_policy_with_its_adapters_off(tmp_path, base, tiny_tokenizer):
    """No deep copy: the reference's log-probs are the starting model's, and stay so as the adapters train."""
    policy = add_adapters(AutoModelForCausalLM.from_pretrained(base / "hf"), compose_cfg(tmp_path, ["peft=lora"]).peft)
    reference = build_reference(policy)
    assert isinstance(reference, AdaptersOff) and reference.policy is policy
    module = DPOModule(policy, {"optimizer": {}}, beta=0.1)
    assert module.reference.policy is policy, "the module builds the same reference itself"
    start = AutoModelForCausalLM.from_pretrained(base / "hf").eval()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[6, 7, 8, 9]])}
    for module_ in policy.modules():  # move the adapters away from zero, as training does
        if hasattr(module_, "lora_B"):
            for weight in module_.lora_B.values():
                torch.nn.init.normal_(weight.weight)
    with torch.no_grad():
        torch.testing.assert_close(
            lm_forward(reference, batch, with_loss=False).logits, lm_forward(start, batch, with_loss=False).logits
        )
        assert not torch.allclose(
            lm_forward(policy, batch, with_loss=False).logits, lm_forward(start, batch, with_loss=False).logits
        )


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_lora_dpo_runs_and_exports(tmp_path, base, reference):
    run = tmp_path / "dpo"
    train(
        compose_cfg(
            run,
            [
                "stage=dpo",
                f"init_from={base}",
                "peft=lora",
                f"stage.module.reference={reference}",
                "max_steps=4",
                *QUIET,
            ],
        )
    )
    assert (run / "hf" / "model.safetensors").is_file() and (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_lora_t5_sft_exports_a_plain_t5(tmp_path):
    run = tmp_path / "t5"
    train(compose_cfg(run, ["model=t5-tiny", "stage=sft", "peft=lora", "max_steps=4", *QUIET]))
    assert AutoModelForSeq2SeqLM.from_pretrained(run / "hf").config.model_type == "t5"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_dpo_learns_with_the_policy_as_its_own_reference(tmp_path, addition_pairs, monkeypatch):
    """DPO from random weights with adapters only: val rewards/accuracies 0.54-0.64 at step 25, 1.0 at step 100
    (3 seeds); the reference train.py hands the module is the policy with its adapters off, no copy of it."""
    references = []

    def spy(policy, ref_from=None):
        references.append((build_reference(policy, ref_from), policy))
        return references[-1][0]

    monkeypatch.setattr("train.build_reference", spy)
    run = tmp_path / "dpo"
    train(
        compose_cfg(
            run,
            [
                *DPO,
                "peft=lora",
                f"data.train_files=[{addition_pairs}]",
                f"data.val_files=[{addition_pairs}]",
                "batch_size=20",
                "max_steps=100",
                "lr=3e-3",
                "beta=0.5",
                "trainer.val_check_interval=25",
                "trainer.limit_val_batches=null",
            ],
        )
    )
    ((reference, policy),) = references
    assert isinstance(reference, AdaptersOff) and reference.policy is policy, "a second model in memory"
    rows = metrics(run)
    accuracies, margins = column(rows, "val/rewards/accuracies"), column(rows, "val/rewards/margins")
    assert len(accuracies) == 4
    assert accuracies[-1] >= 0.8 and accuracies[-1] - accuracies[0] >= 0.2, f"val rewards/accuracies {accuracies}"
    assert margins[-1] > margins[0] > 0, f"val rewards/margins {margins}"


def test_a_lora_classifier_trains_adapters_and_head_learns_and_exports_the_merged_classifier(tmp_path, base):
    """stage=classify peft=lora on a pretrained backbone: adapters and the new head train (stage.module.trainable=all
    is not used with adapters), the backbone stays bit-identical, the task is learnt (class weights on), and hf/ is a
    plain classifier with the logits of the base + adapter/ (last-token pooling through padding included)."""
    run = tmp_path / "classify"
    train(
        compose_cfg(
            run,
            [
                "stage=classify",
                f"init_from={base}",
                "peft=lora",
                "stage.module.trainable=all",
                "data.balance=class_weights",
                "max_steps=30",
                "batch_size=16",
                "seq_len=48",
                "trainer.val_check_interval=15",
                "callbacks.samples.num_prompts=0",
            ],
        )
    )
    start = load_file(base / "hf" / "model.safetensors")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    prefix = "model.base_model.model."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "every adapter trained"
    head, initial_head = state["score.modules_to_save.default.weight"], state["score.original_module.weight"]
    assert not torch.equal(head, initial_head), "the head trained"
    backbone = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k and "score." not in k}
    assert backbone.keys() == {k for k in start if k.startswith("model.")}
    for name, weights in backbone.items():
        assert torch.equal(weights, start[name]), f"{name}: the backbone changed"
    trained = sum(v.numel() for v in lora.values()) + head.numel()
    moments = checkpoint["optimizer_states"][0]["state"].values()
    assert sum(m["exp_avg"].numel() for m in moments) == trained, "the optimizer holds the adapters and the head only"

    test = next(r for r in metrics(run) if r.get("test/balanced_acc"))
    assert float(test["test/balanced_acc"]) >= 0.8, f"test balanced accuracy {test['test/balanced_acc']} (chance 0.5)"

    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    texts = ["WINNER! You have won a prize, call now to claim it", "See you at 6"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all(), "a padded row"
    merged = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    new_head = AutoModelForSequenceClassification.from_pretrained(base / "hf", num_labels=2)
    adapted = PeftModel.from_pretrained(new_head, run / "adapter").eval()
    with torch.no_grad():
        logits = merged(**batch).logits
        torch.testing.assert_close(logits, adapted(**batch).logits, rtol=1e-4, atol=1e-4)
        for text, row in zip(texts, logits, strict=True):
            torch.testing.assert_close(adapted(**tokenizer(text, return_tensors="pt")).logits[0], row)
    assert merged.config.id2label == {0: "ham", 1: "spam"}


@pytest.mark.parametrize("model, labels", [("llama-tiny", None), ("gpt2-tiny", ["ham", "spam"])])
def test_flops_with_adapters_count_the_gradient_through_the_frozen_layers(tmp_path, tiny_tokenizer, model, labels):
    """Adapters sit in every block, so the backward pass computes the input gradient of every frozen layer: 4 FLOPs
    per frozen matmul parameter and token, 6 per trainable one (adapters, a classifier's head); the original head peft
    keeps beside the one it trains never runs."""
    cfg = compose_cfg(tmp_path, [f"model={model}", "peft=lora"])
    plain = build_model(cfg.model, tiny_tokenizer, labels)
    adapted = add_adapters(build_model(cfg.model, tiny_tokenizer, labels), cfg.peft)
    trainable = count_parameters(adapted, trainable_only=True)
    assert trainable == sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n or "modules_to_save" in n)
    matmuls = flops_per_token(plain, 0) / 6  # everything trains: 6 per matmul parameter (no attention term at length 0)
    head = plain.score.weight.numel() if labels else 0  # trains under adapters too, as a copy
    assert flops_per_token(adapted, 0) == 4 * (matmuls - head) + 6 * trainable
    attention = flops_per_token(plain, 16) - flops_per_token(plain, 0)
    assert flops_per_token(adapted, 16) - flops_per_token(adapted, 0) == attention


def test_flops_of_a_t5_with_adapters_count_the_gradient_through_both_frozen_sides(tmp_path, tiny_tokenizer):
    """The same on each side of an encoder-decoder: the gradient reaches the encoder's adapters through the decoder."""
    cfg = compose_cfg(tmp_path, ["model=t5-tiny", "peft=lora"])
    plain = build_model(cfg.model, tiny_tokenizer)
    adapted = add_adapters(build_model(cfg.model, tiny_tokenizer), cfg.peft)
    table = plain.get_input_embeddings().weight.numel()  # the shared look-up; the tied head is the decoder's matmul
    encoder = count_parameters(plain.get_encoder()) - table
    decoder = count_parameters(plain.get_decoder()) - table + plain.get_output_embeddings().weight.numel()
    lora = [count_parameters(side, trainable_only=True) for side in (adapted.get_encoder(), adapted.get_decoder())]
    shapes = (2, 20), (2, 6)
    # per side and token, 6 x N when all trains; with adapters 4 x N (frozen) + 6 x adapters
    difference = 2 * ((2 * encoder - 6 * lora[0]) * 20 + (2 * decoder - 6 * lora[1]) * 6)
    assert flops_per_batch(plain, *shapes) - flops_per_batch(adapted, *shapes) == difference


def test_qlora_is_refused_without_a_trained_base_or_a_gpu(tmp_path, base):
    """peft=qlora quantizes init_from's weights with bitsandbytes' CUDA kernels: anything else is a clear error."""
    with pytest.raises(ValueError, match="set init_from"):
        train(compose_cfg(tmp_path / "a", ["stage=sft", "peft=qlora", "max_steps=1", *QUIET]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU.*peft=lora"):
            train(compose_cfg(tmp_path / "b", ["stage=sft", f"init_from={base}", "peft=qlora", "max_steps=1"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' 4-bit kernels)")
def test_qlora_trains_adapters_on_a_4bit_base_resumes_and_exports_full_precision(tmp_path, base):
    run = tmp_path / "qlora"
    args = ["trainer=gpu", "stage=sft", f"init_from={base}", "peft=qlora", "lr=1e-2", "checkpoint_every=4", *QUIET]
    train(compose_cfg(run, [*args, "max_steps=8", "resume=auto"]))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state), "a QLoRA checkpoint holds the adapters, not the 4-bit base"
    train(compose_cfg(run, [*args, "max_steps=12", "resume=auto"]))  # the base comes from init_from again
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert "quantization_config" not in (run / "hf" / "config.json").read_text(), "hf/ is full precision"
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")
    ids = tokenizer("Alice has 3 apples. 三加四等于七。", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base / "hf"), run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(**ids).logits, AutoModelForCausalLM.from_pretrained(base / "hf")(**ids).logits)
