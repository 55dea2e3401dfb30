"""The entry points as a user runs them: train.py, the pretrain -> SFT -> generate chain (sweep.py: test_sweep.py)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import yaml
from conftest import REPO, SFT_TENTH, TEXT_TENTH, TINY, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow  # entry points run as subprocesses


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """python train.py (tiny limits), then stage=sft init_from=<that run>, each on a tenth of its stage's bundled
    sample data (what these tests check is the run folder, the loading and the generation, whatever the data)."""
    out = tmp_path_factory.mktemp("outputs")
    common = [
        *[t for t in TINY if not t.startswith("logger=")],
        "max_steps=20",
        "trainer.val_check_interval=10",
        f"paths.log_dir={out}",
        f"paths.cache_dir={out}/cache",
    ]
    run_script("train.py", TEXT_TENTH, *common)
    (pretrain,) = (out / "pretrain" / "llama-tiny").iterdir()
    run_script("train.py", "stage=sft", SFT_TENTH, f"init_from={pretrain}", *common)
    (sft,) = (out / "sft" / "llama-tiny").iterdir()
    return pretrain, sft


def test_train_leaves_a_self_describing_run_folder(chain):
    pretrain, _ = chain
    config = yaml.safe_load((pretrain / ".hydra" / "config.yaml").read_text())
    assert config["stage"]["name"] == "pretrain" and config["max_steps"] == 20
    header = (pretrain / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/ppl", "val/acc", "lr", "step"} <= set(header)
    assert (pretrain / "checkpoints" / "last.ckpt").is_file()
    assert list((pretrain / "checkpoints").glob("best-step*.ckpt"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (pretrain / "hf").iterdir()
    }
    samples = [json.loads(line) for line in (pretrain / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "output"} <= samples[0].keys()
    # wandb ran offline into the run folder, under the run's stable id
    assert list((pretrain / "wandb").glob("offline-run-*"))


def test_sft_from_pretrain_then_chat_style_generation(chain):
    _, sft = chain
    config = yaml.safe_load((sft / ".hydra" / "config.yaml").read_text())
    assert config["stage"]["name"] == "sft" and config["init_from"]
    assert "loaded LlamaForCausalLM" in (sft / "train.log").read_text()
    out = run_script("generate.py", f"run={sft}", "prompt=What is 3 plus 4?", "generation.max_new_tokens=8")
    # what plain transformers makes of the export with the tokenizer's chat template, greedy
    tok = AutoTokenizer.from_pretrained(sft / "hf")
    model = AutoModelForCausalLM.from_pretrained(sft / "hf")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    reply = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.stdout == tok.decode(reply[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) + "\n"


@pytest.fixture
def train_py(monkeypatch, capsys):
    """``python train.py <args>`` for a command line that must fail before training starts, run in this process:
    train.py executed as ``__main__`` (runpy), so its Hydra command line parses the arguments, composes and reports
    the error with its exit status as in a terminal, without a second interpreter importing torch and Lightning.
    Returns the exit status and what it wrote to stderr."""
    from hydra._internal import utils as hydra_utils

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # as in a terminal: Hydra re-raises instead of reporting when it sees a tracer (a debugger, coverage)
    monkeypatch.setattr(hydra_utils, "is_under_debugger", lambda: False)

    def run(*args: str) -> tuple[int, str]:
        script = str(REPO / "train.py")
        monkeypatch.setattr(sys, "argv", [script, *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(script, run_name="__main__")
        return exited.value.code, capsys.readouterr().err

    return run


def test_unknown_group_option_lists_the_options(train_py):
    status, stderr = train_py("model=llama-huge")
    assert status != 0
    assert "Could not find 'model/llama-huge'" in stderr
    assert "gpt2-medium" in stderr and "llama-moe" in stderr  # the available options


def test_unknown_key_is_rejected(train_py):
    status, stderr = train_py("learning_rate=1e-3")
    assert status != 0
    assert "Could not override 'learning_rate'" in stderr
