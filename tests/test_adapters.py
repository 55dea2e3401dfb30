"""peft=lora (issue 17, item 1): only the adapters train and the base stays bit-identical; hf/ holds the merged
model, whose logits equal the adapted model's; DPO's reference is the policy with its adapters off (no second model);
T5 too; a classifier's adapters are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lightning_modules.dpo import AdaptersOff, DPOModule, build_reference
from lightning_modules.lm import lm_forward
from lmlab.core.adapters import add_adapters
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


def test_a_classifier_with_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="peft=lora trains adapters for stage=sft and stage=dpo"):
        train(compose_cfg(tmp_path, ["stage=classify", "peft=lora", "max_steps=1"]))
