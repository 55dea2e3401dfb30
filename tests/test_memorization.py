"""No silent memorization: hf/ holds the best checkpoint, the run warns when it memorizes and writes summary.json,
early stopping is a conf knob, and the LM loss weighs every label token of an optimizer step equally."""

from __future__ import annotations

import copy
import csv
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate
from safetensors.torch import load_file
from test_nan_guard import run_ranks
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from lightning_modules.lm import LMModule, lm_forward
from lmlab.core.collate import IGNORE_INDEX
from lmlab.core.models import count_parameters
from lmlab.core.tokenizer import load_tokenizer
from train import connect_data, train

# --- a run that memorizes: 8 random digit strings, 40 epochs at a constant high lr, validated on 8 others


def digit_rows(rng: random.Random, n: int) -> str:
    return "".join(
        json.dumps({"prompt": f"code {i}", "response": "".join(rng.choices("0123456789", k=12))}) + "\n"
        for i in range(n)
    )


def overfit_overrides(tmp_path: Path, *extra: str) -> list[str]:
    rng = random.Random(0)
    (tmp_path / "train.jsonl").write_text(digit_rows(rng, 8))
    (tmp_path / "val.jsonl").write_text(digit_rows(rng, 8))
    return [
        "stage=sft",
        f"data.train_files=[{tmp_path}/train.jsonl]",
        f"data.val_files=[{tmp_path}/val.jsonl]",
        "max_steps=40",
        "lr=1e-2",
        "min_lr=1e-2",
        "warmup_steps=2",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "callbacks.samples.num_prompts=0",
        *extra,
    ]


@contextmanager
def captured(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger ``name`` (caplog is per test; this serves a module-scoped run)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory) -> tuple[Path, list[logging.LogRecord]]:
    tmp_path = tmp_path_factory.mktemp("overfit")
    with captured("lmlab") as records:
        train(compose_cfg(tmp_path / "run", overfit_overrides(tmp_path)))
    return tmp_path / "run", records


def val_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


def model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def test_export_holds_the_best_val_loss_weights(overfit_run):
    run, records = overfit_run
    losses = val_losses(run)
    best_step = min(losses, key=losses.get)
    assert best_step < 40 and losses[40] > losses[best_step], f"val/loss must rise by the end: {losses}"
    (best,) = (run / "checkpoints").glob("best-step*.ckpt")
    assert best.name == f"best-step{best_step}.ckpt"
    exported = load_file(run / "hf" / "model.safetensors")
    best_weights, last_weights = model_weights(best), model_weights(run / "checkpoints" / "last.ckpt")
    assert exported.keys() <= best_weights.keys()
    assert all(torch.equal(exported[k], best_weights[k]) for k in exported)
    assert not all(torch.equal(exported[k], last_weights[k]) for k in exported)
    assert any(f"step {best_step} (val/loss=" in r.getMessage() for r in records if r.name == "lmlab.train")


def test_memorization_warnings_fire_on_a_run_that_memorizes(overfit_run):
    _, records = overfit_run
    warnings = [
        r.getMessage() for r in records if r.name == "lmlab.train.memorization" and r.levelno == logging.WARNING
    ]
    assert any("= 40 epochs of the 8 training samples" in w for w in warnings), warnings
    assert any("gap widened at each of the last 3 validations" in w for w in warnings), warnings


def test_summary_counts_what_the_run_saw(overfit_run):
    run, _ = overfit_run
    summary = json.loads((run / "summary.json").read_text())
    cfg = compose_cfg(run, overfit_overrides(run.parent))
    dm = instantiate(cfg.data)
    connect_data(cfg, dm, load_tokenizer(run / "hf"))
    dm.setup("fit")
    one_epoch = int(dm.collator()([dm.train_set[i] for i in range(len(dm.train_set))])["attention_mask"].sum())
    assert summary["steps"] == 40 and summary["epochs_seen"] == 40.0  # one batch of 8 samples is one epoch
    assert summary["tokens_seen"] == 40 * one_epoch
    assert summary["parameters"] == count_parameters(LlamaForCausalLM.from_pretrained(run / "hf"))
    assert summary["tokens_per_parameter"] == pytest.approx(summary["tokens_seen"] / summary["parameters"])
    losses = val_losses(run)
    best_step = min(losses, key=losses.get)
    assert summary["best"] == {"metric": "val/loss", "value": pytest.approx(losses[best_step]), "step": best_step}
    final = summary["final"]
    assert final["step"] == 40 and final["val_loss"] == pytest.approx(losses[40])
    assert final["gap"] == pytest.approx(final["val_loss"] - final["train_loss"]) and final["gap"] > 0


def test_a_run_that_does_not_memorize_stays_quiet(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.train.memorization")
    train(
        compose_cfg(
            tmp_path,
            [
                "max_steps=20",
                "trainer.val_check_interval=4",
                "trainer.log_every_n_steps=1",
                "callbacks.samples.num_prompts=0",
            ],
        )
    )
    records = [r for r in caplog.records if r.name == "lmlab.train.memorization"]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    assert any(r.getMessage().startswith("plan: 20 steps") for r in records)
    assert len(val_losses(tmp_path)) == 5  # enough validations for the gap rule (3 widenings) to have looked
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {
        "steps",
        "tokens_seen",
        "epochs_seen",
        "parameters",
        "trainable_parameters",
        "tokens_per_parameter",
        "best",
        "final",
    }


def test_early_stopping_ends_the_run_and_export_last_keeps_the_final_weights(tmp_path):
    train(
        compose_cfg(
            tmp_path / "run",
            overfit_overrides(tmp_path, "callbacks.early_stopping.patience=2", "export=last", "checkpoint_every=1"),
        )
    )
    run = tmp_path / "run"
    losses = val_losses(run)
    best_step = min(losses, key=losses.get)
    steps = json.loads((run / "summary.json").read_text())["steps"]
    assert steps == max(losses) == best_step + 8 < 40, f"stopped at {steps}, two validations after the best: {losses}"
    exported = load_file(run / "hf" / "model.safetensors")
    last = model_weights(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    assert all(torch.equal(exported[k], last[k]) for k in exported)


# --- loss weighting: an optimizer step's gradient is the mean over all its label tokens


class GradRecorder(LMModule):
    """LMModule keeping the gradients the optimizer is handed (rank 0 also saves them to ``grads_path``)."""

    def __init__(
        self, *args, per_rank_batches: list[list[dict]] | None = None, grads_path: str | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.per_rank_batches = per_rank_batches
        self.grads_path = grads_path
        self.grads: dict[str, torch.Tensor] = {}

    def train_dataloader(self) -> DataLoader:  # under DDP each rank reads its own micro-batches
        return DataLoader(self.per_rank_batches[self.global_rank], batch_size=None)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        if self.grads_path and self.global_rank == 0:
            torch.save(self.grads, self.grads_path)


OPTIM = {
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
    "weight_decay": 0.0,
    "decay_embeddings": False,
    "warmup_steps": 1,
    "min_lr": 1e-4,
}


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = compose_cfg(Path("/unused"), [f"model={'t5-tiny' if arch == 'seq2seq' else 'llama-tiny'}"]).model.config
    config = instantiate(cfg, vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0)
    return (T5ForConditionalGeneration if arch == "seq2seq" else LlamaForCausalLM)(config)


def micro_batch(arch: str, label_lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Rows of random tokens whose labels keep the first ``n`` positions of row i (-100 after)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(label_lengths), 10
    input_ids = torch.randint(2, 64, (rows, width), generator=g)
    labels = torch.randint(2, 64, (rows, 6 if arch == "seq2seq" else width), generator=g)
    for row, n in enumerate(label_lengths):
        labels[row, n:] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def merged(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def trained_grads(
    model: torch.nn.Module,
    per_rank: list[list[dict]],
    accumulate: int,
    tmp_path: Path,
    devices: int = 1,
    gpu: bool = False,
    strategy: str | None = None,
) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step through Lightning's automatic optimization (``gpu``: bf16 and compile;
    ``strategy``: by default ddp_spawn on more than one device)."""
    module = GradRecorder(
        copy.deepcopy(model), OPTIM, compile=gpu, per_rank_batches=per_rank, grads_path=str(tmp_path / "g.pt")
    )
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=devices,
        precision="bf16-mixed" if gpu else None,
        strategy=strategy or ("ddp_spawn" if devices > 1 else "auto"),
        max_steps=1,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    return torch.load(tmp_path / "g.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", ["causal", "seq2seq"])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tmp_path, arch):
    """3 and 20 label tokens in two micro-batches: each token weighs 1/23, not 1/6 and 1/40 (a mean of means)."""
    model = tiny_model(arch)
    short = micro_batch(arch, [2, 1], seed=1)
    long = micro_batch(arch, [6, 6, 6, 2] if arch == "seq2seq" else [10, 10], seed=2)
    accumulated = trained_grads(model, [[short, long]], accumulate=2, tmp_path=tmp_path)
    one_batch = trained_grads(model, [[merged([short, long])]], accumulate=1, tmp_path=tmp_path)
    assert accumulated.keys() == one_batch.keys()
    for name in one_batch:
        torch.testing.assert_close(accumulated[name], one_batch[name], msg=name)

    naive = copy.deepcopy(model)  # what a per-micro-batch mean would give: the test tells the two apart
    (sum(lm_forward(naive, b, with_loss=True).loss for b in (short, long)) / 2).backward()
    assert any(not torch.allclose(p.grad, one_batch[n]) for n, p in naive.named_parameters() if p.grad is not None)


def test_one_micro_batch_on_one_device_is_the_plain_mean_loss_bit_for_bit(tmp_path):
    model = tiny_model("causal")
    batch = micro_batch("causal", [3, 10], seed=3)
    grads = trained_grads(model, [[batch]], accumulate=1, tmp_path=tmp_path)
    plain = copy.deepcopy(model)
    lm_forward(plain, batch, with_loss=True).loss.backward()
    assert all(torch.equal(p.grad, grads[n]) for n, p in plain.named_parameters())


def _ddp_step(rank: int, model: torch.nn.Module, per_rank: list[list[dict]], tmp_path: Path) -> None:
    """One rank of a 2-rank gloo group (tests/test_nan_guard.py's run_ranks): one optimizer step of 2 micro-batches."""
    trained_grads(model, per_rank, accumulate=2, tmp_path=tmp_path, devices=2, strategy="ddp")


@pytest.mark.slow
def test_ddp_ranks_and_accumulation_give_the_gradient_of_one_batch(tmp_path):
    """2 ranks x 2 micro-batches with 3, 20, 11 and 7 label tokens equal one batch of all 41 tokens. The ranks are
    forked (run_ranks: strategy=ddp with torchrun's variables), not spawned: the same DDP all-reduce without two
    fresh interpreters importing torch and Lightning."""
    model = tiny_model("causal")
    batches = [micro_batch("causal", lengths, seed=10 + i) for i, lengths in enumerate([[2, 1], [10, 10], [9, 2], [7]])]
    (tmp_path / "ranks").mkdir()
    results = run_ranks(_ddp_step, model, [batches[:2], batches[2:]], tmp_path, out_dir=tmp_path / "ranks")
    assert all("returned" in result for result in results), results
    distributed = torch.load(tmp_path / "g.pt", map_location="cpu", weights_only=True)
    one_batch = trained_grads(model, [[merged(batches)]], accumulate=1, tmp_path=tmp_path)
    for name in one_batch:
        torch.testing.assert_close(distributed[name], one_batch[name], msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [1, 2])
def test_gpu_compiled_bf16_weighting_gives_the_gradient_of_one_batch(tmp_path, devices):
    """The same under bf16-mixed with a compiled model (its own loss), on one GPU or two (NCCL), up to bf16 rounding."""
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA GPUs")
    model = tiny_model("causal")
    batches = [micro_batch("causal", lengths, seed=10 + i) for i, lengths in enumerate([[2, 1], [10, 10], [9, 2], [7]])]
    per_rank = [batches[:2], batches[2:]] if devices == 2 else [batches]
    weighted = trained_grads(model, per_rank, accumulate=4 // devices, tmp_path=tmp_path, devices=devices, gpu=True)
    one_batch = trained_grads(model, [[merged(batches)]], accumulate=1, tmp_path=tmp_path, gpu=True)
    naive = copy.deepcopy(model)  # a mean of means, in fp32 on the CPU
    (sum(lm_forward(naive, b, with_loss=True).loss for b in batches) / 4).backward()

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[name].float().flatten() for name in sorted(one_batch)])

    def error(grads: dict[str, torch.Tensor]) -> float:
        reference = flat(one_batch)
        return float(torch.linalg.vector_norm(flat(grads) - reference) / torch.linalg.vector_norm(reference))

    naive_grads = {n: p.grad for n, p in naive.named_parameters()}
    assert error(weighted) < 0.02 < error(naive_grads), (error(weighted), error(naive_grads))
