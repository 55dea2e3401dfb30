"""Issue 15: trainer=ddp and trainer=fsdp (conf/trainer/), the presets for the GPUs of one host, proven here on 2 CPU
ranks (gloo, forked: tests/test_nan_guard.py's run_ranks) as the other DDP tests are: a short pretraining run
finishes, resumes from its checkpoint to the uninterrupted run's weights, and its hf/ export loads with plain
transformers; under fsdp the stages it cannot run yet are refused at startup."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from safetensors.torch import load_file
from test_nan_guard import run_ranks
from test_resume_epochs import checkpoint_at, resume_from
from transformers import AutoModelForCausalLM

from lightning_modules.base import SHARDED_KEY
from lmlab.train.sharding import check_resume
from train import train

# the presets on 2 CPU ranks: what the tests of strategy=ddp set, the rest as the preset has it
ON_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """The first 120 lines of the bundled English text: epochs of 5 batches of 8 per rank."""
    path = tmp_path_factory.mktemp("text") / "pretrain_en.txt"
    head = (REPO / "data" / "sample" / "pretrain_en.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:120]
    path.write_text("".join(head), encoding="utf-8")
    return path


def overrides(text: Path, preset: str) -> list[str]:
    return [
        f"trainer={preset}",
        *ON_CPU,
        f"data.train_files=[{text}]",
        "data.val_fraction=0.2",
        "callbacks.samples.num_prompts=0",
        "max_steps=6",
        "trainer.log_every_n_steps=2",  # train/loss and train/grad_norm at steps 2, 4, 6
        "checkpoint_every=3",
        "callbacks.last.save_top_k=-1",  # keep epoch=E-step=S.ckpt beside last.ckpt
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "export=last",
    ]


def _train_on_rank(rank: int, run: Path, overrides: list[str]) -> None:
    train(compose_cfg(run, overrides))


def on_two_ranks(run: Path, overrides: list[str], tokenizer: Path) -> list[dict]:
    """train.py on 2 ranks in ``run``, with a tokenizer trained beforehand (two ranks never write one together)."""
    if not (run / "tokenizer").exists():
        shutil.copytree(tokenizer, run / "tokenizer")
    ranks = run.parent / f"{run.name}-ranks"
    ranks.mkdir()
    return run_ranks(_train_on_rank, run, overrides, out_dir=ranks, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, text) -> Path:
    """The BPE a run on ``text`` trains (a one-step run on one process)."""
    run = tmp_path_factory.mktemp("tokenizer-run")
    train(compose_cfg(run, [f"data.train_files=[{text}]", "data.val_fraction=0.2", "max_steps=1", "logger=csv"]))
    return run / "tokenizer"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text, tokenizer):
    """``straight(preset)``: the run folder of an uninterrupted 6-step run on 2 ranks under ``trainer=<preset>`` (made
    once per module: the resume test and the comparison of the presets share it)."""
    runs = {}

    def run(preset: str) -> Path:
        if preset not in runs:
            runs[preset] = tmp_path_factory.mktemp(preset) / "straight"
            results = on_two_ranks(runs[preset], overrides(text, preset), tokenizer)
            assert all("returned" in result for result in results), results
        return runs[preset]

    return run


def test_the_presets_build_on_the_gpu_preset_with_two_devices(tmp_path):
    """trainer=ddp and trainer=fsdp are trainer=gpu (bf16-mixed) on 2 devices, each with its strategy."""
    for preset, strategy in (("ddp", DDPStrategy), ("fsdp", FSDPStrategy)):
        cfg = compose_cfg(tmp_path, [f"trainer={preset}"])
        assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.devices) == ("gpu", "bf16-mixed", 2)
        assert isinstance(instantiate(cfg.trainer.strategy), strategy)
        assert cfg.trainer.plugins[0]._target_.endswith("AtomicCheckpointIO"), "checkpoints stay atomic"


def test_fsdp_under_bf16_mixed_reduces_gradients_and_keeps_buffers_in_fp32(tmp_path):
    """Lightning's FSDP bf16-mixed reduces the gradients in bf16 and rounds buffers (RoPE's inv_freq) to bf16; the
    preset computes in bf16 but reduces and keeps buffers in fp32, as DDP does, and follows trainer.precision."""
    strategy = instantiate(compose_cfg(tmp_path, ["trainer=fsdp"]).trainer.strategy)
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    config = strategy.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, *[torch.float32] * 2)
    strategy.precision_plugin = FSDPPrecision("32-true")
    assert strategy.mixed_precision_config.param_dtype == torch.float32


@pytest.mark.parametrize(
    "stage, refused",
    [
        (["stage=dpo"], "stage=dpo"),
        (["stage=sft", "peft=lora"], "peft="),
        (["stage=vlm"], "stage=vlm"),
    ],
    ids=["dpo", "peft", "vlm"],
)
def test_fsdp_refuses_what_it_cannot_shard_yet_at_startup(tmp_path, stage, refused):
    with pytest.raises(ValueError, match="trainer=fsdp does not support") as error:
        train(compose_cfg(tmp_path, ["trainer=fsdp", *ON_CPU, *stage]))
    assert refused in str(error.value) and "use trainer=ddp" in str(error.value)
    assert not any(tmp_path.iterdir()), "nothing was built or written"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ddp", "fsdp"])
def test_a_preset_run_resumes_bit_identical_and_exports(tmp_path, text, tokenizer, straight, preset):
    """6 steps on 2 ranks (epochs of 5 batches per rank), checkpointed at step 3 (mid epoch 0): a run resumed there
    (resume=auto, after a kill during the next checkpoint write) crosses an epoch boundary and ends on the same
    weights, the checkpoint is one whole file (under fsdp too: gathered from the shards), and hf/ loads with plain
    transformers."""
    run = straight(preset)
    checkpoint = checkpoint_at(run, 3)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and len(state["rng_states"]) == 2, "one file holding both ranks' state"
    exported = load_file(run / "hf" / "model.safetensors")
    shapes = {name: state["state_dict"][f"model.{name}"].shape for name in exported}
    assert shapes == {name: w.shape for name, w in exported.items()}, "the whole model, not rank 0's shard"

    resumed = tmp_path / "resumed"
    resume_from(checkpoint, run, resumed)
    results = on_two_ranks(resumed, [*overrides(text, preset), "resume=auto"], tokenizer)
    assert all("returned" in result for result in results), results
    again = load_file(resumed / "hf" / "model.safetensors")
    assert exported.keys() == again.keys()
    for name in exported:
        assert torch.equal(exported[name], again[name]), f"{name} differs after a {preset} resume at step 3"

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, w in model.state_dict().items():
        if name in exported:
            assert torch.equal(w, exported[name]), name
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.slow
def test_fsdp_trains_as_ddp(straight):
    """The same run under both presets: equal losses and gradient norms (the whole model's, not rank 0's shard's:
    TrainingModule.configure_gradient_clipping reads it from the FSDP root; a rank-local norm logged 1.26 where DDP
    logged 1.63) and the same weights, up to the order of
    the floating-point sums (all-reduce vs reduce-scatter)."""
    ddp, fsdp = straight("ddp"), straight("fsdp")

    def logged(run: Path, key: str) -> list[float]:
        with open(run / "metrics.csv", encoding="utf-8") as f:
            return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]

    for key in ("train/loss", "train/grad_norm"):
        assert len(logged(ddp, key)) >= 2
        assert logged(fsdp, key) == pytest.approx(logged(ddp, key), rel=1e-4), key
    a, b = load_file(ddp / "hf" / "model.safetensors"), load_file(fsdp / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-3, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("written", "now"), [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_checkpoint_resumed_across_fsdp_and_ddp_is_refused_at_startup(tmp_path, text, straight, written, now):
    """Their optimizer states have other layouts (torch failed deep in the restore: "loaded state dict contains a
    parameter group that doesn't match"): refused before anything is built, naming both and init_from."""
    resumed = tmp_path / "resumed"
    resume_from(checkpoint_at(straight(written), 3), straight(written), resumed)
    with pytest.raises(ValueError, match=r"was written under .* this run uses .* init_from=") as error:
        train(compose_cfg(resumed, [*overrides(text, now), "resume=auto"]))
    assert ("trainer=fsdp" in str(error.value).split("this run uses")[now == "fsdp"]) is True
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoints", "tokenizer"], "nothing was written"


def test_a_checkpoint_without_the_sharded_flag_is_let_through(tmp_path):
    """One written before checkpoints recorded it cannot tell which trainer wrote it: no refusal either way."""
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"global_step": 3}, checkpoint)
    for preset in ("ddp", "fsdp"):
        check_resume(checkpoint, compose_cfg(tmp_path, [f"trainer={preset}"]))
    torch.save({"global_step": 3, SHARDED_KEY: True}, checkpoint)
    with pytest.raises(ValueError, match="written under trainer=fsdp"):
        check_resume(checkpoint, compose_cfg(tmp_path, ["trainer=ddp"]))
