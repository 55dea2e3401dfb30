"""SFT training throughput of lmlab with padded batches against packed ones (``packing=true``), on Alpaca-like data.

Instruction-tuning samples are short and uneven (the Chinese Alpaca set's average ~94 tokens, its longest ~790 with
the byte-level BPE of 6400 tokens), so a batch padded to its longest sample is mostly padding and tokens/s of the
padded tensor overstates the work that trains. This benchmark measures what packing buys: **real tokens/s**, the
non-pad input tokens a second (padded: ``attention_mask.sum()``; packed: ``sum(document_lengths)``), beside padded
tokens/s (the tensor's size), steps/s, peak GPU memory, lmlab's MFU (its own FLOP count: a padded batch counts its pads,
a packed row each sample's attention over its own length) and the mean training loss, which must agree between
padded and packed runs up to bf16 noise since packing is exact (same samples, same order, same weights).

Each configuration is ``train.train(cfg)`` on the config ``python train.py stage=sft data=zh_alpaca model=<model>
trainer=gpu`` composes (bf16-mixed, fused AdamW, SDPA), with validation, sample generations and periodic checkpoints
off, run in this one process one after the other:

- ``padded``: ``packing=false`` (rows padded to the batch's longest, rounded up to 64; no attention mask, sdpa);
- ``packed``: ``packing=true`` (one row per batch, position ids restarting per sample) with the default
  ``packed_attention=auto``: on a GPU, torch's variable-length flash kernel over each sample (the blocks between
  samples never computed), on the CPU the mask below;
- ``packed_mask``: ``packing=true packed_attention=mask`` (transformers builds a block-diagonal mask of the whole row,
  so SDPA computes every block; before 2026-12-01 this was ``packed_sdpa``, the only packed SDPA path);
- ``packed_flex``: ``packing=true model.attn_implementation=flex_attention`` (the blocks between samples skipped);
- ``packed_graphs``: ``packing=true compile=reduce-overhead``: as ``packed``, with the compiled step's kernels replayed
  as CUDA graphs (rows padded to a multiple of 256 under ``pad_to_multiple_of=auto``: a graph per width), in both
  compile passes; ``packed_graphs64`` / ``packed_graphs512``: the same at a multiple of 64 (many more widths, so more
  recordings) / 512 (fewer),

each with ``compile=false`` and ``compile=true``, and beside them the anchor, TRL's ``SFTTrainer`` (trl 1.16), in the
same process on the same samples (lmlab's tokenized ``input_ids`` and ``labels``, in the order lmlab's loader draws
them, so the same batches), from the same saved random base (``init_from`` of the lmlab runs), with lmlab's batch size,
steps, lr schedule, AdamW settings, grad clip, precision (bf16 autocast over fp32 weights), compile setting, loader
workers and pad multiple, and no gradient checkpointing (TRL's default is on; lmlab has none):

- ``trl_padded``: rows padded to the batch's longest (with an attention mask);
- ``trl_padding_free``: ``padding_free=True``, the batch's samples in one row with restarting position ids (as lmlab's
  packed rows; ``--trl-attn``, default ``flash_attention_2`` where the flash_attn package is installed, else sdpa);
- ``trl_packed``: ``packing=True, packing_strategy="bfd"``: the data set packed into ``seq_len`` rows, ``batch_size``
  rows a step (padding-free), so other batches than lmlab's: compare its real tokens/s only.

Each lmlab run's real tokens/s and peak memory are divided by the fastest TRL run's (same compile setting) and by the
TRL run that lays out the batch the same way; trl_padded and trl_padding_free must match the padded run's losses. TRL
is optional (``pip install -e ".[bench]"``): without it the script says so, unless no trl_* variant is asked for.

A callback (``WindowTimer``; for TRL, its trainer's ``training_step`` and a TrainerCallback) skips ``--warmup`` steps
(compilation included), synchronizes the GPU, times the next ``--steps`` steps on the host clock and synchronizes
again at the end only; tokens and losses are summed on the device in between, peak memory (allocated, and reserved:
CUDA graphs' pool is only there) is over those steps. Torch's
dynamo graph count before and after the window shows whether anything recompiled inside it. A configuration that
fails (e.g. flex attention on this torch / transformers) is recorded with its error and the others go on. Results go
to ``<date>_<gpu>_sft_packing.{json,md}`` (``sft_trl`` with TRL runs, ``sft_adapters`` with adapters) in ``$OUT`` if
set, else the current folder, rewritten after each configuration.

    python benchmarks/sft_throughput.py --tokenizer <folder> [--override paths.data_dir=<data>]   # GPU, 8+ min
    V=padded,packed,packed_mask,packed_flex,trl_padded,trl_padding_free,trl_packed   # lmlab vs TRL, no adapters
    python benchmarks/sft_throughput.py --tokenizer <folder> --variants $V   # GPU
    python benchmarks/sft_throughput.py --smoke --tokenizer <folder>   # CPU check: llama-tiny, 3 steps, with TRL
    python benchmarks/sft_throughput.py --tokenizer <folder> --variants packed --profile-steps 10   # + where a step's
        # time goes: 10 more steps under torch.profiler, per step the wall and GPU-busy ms, top kernels and host ops

The defaults are the llama_matelike_sft recipe's shape and lr: ``model=llama`` (246M at vocab 6400), 32 samples,
seq_len 512, lr 1e-4 -> 1e-5. On an H200 (2026-11-30) ``packed_flex`` with ``compile=true`` had not finished its first
10 steps after ~2.5 min; lmlab's preemption callback holds a SIGTERM until the step ends, so bound a run with
``timeout -s KILL``. On a machine without hydra-core/omegaconf/torchdata, install them first (train.py needs them).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

VARIANTS = {  # name -> Hydra overrides on top of the common ones
    "padded": ["packing=false"],
    "packed": ["packing=true"],
    "packed_mask": ["packing=true", "packed_attention=mask"],
    "packed_graphs": ["packing=true", "compile=reduce-overhead"],
    "packed_graphs64": ["packing=true", "compile=reduce-overhead", "pad_to_multiple_of=64"],
    "packed_graphs512": ["packing=true", "compile=reduce-overhead", "pad_to_multiple_of=512"],
    "packed_flex": ["packing=true", "model.attn_implementation=flex_attention"],
    "padded_lora": ["packing=false", "peft=lora"],
    "packed_lora": ["packing=true", "peft=lora"],
    "padded_qlora": ["packing=false", "peft=qlora"],
    "packed_qlora": ["packing=true", "peft=qlora"],
}
ADAPTED = ("lora", "qlora")  # variants named *_lora / *_qlora train adapters on a saved base (init_from)
TRL_VARIANTS = {  # the anchor: TRL's SFTTrainer, name -> its SFTConfig settings beyond the common ones (run_trl)
    "trl_padded": {"padding_free": False, "packing": False, "max_length": None},
    "trl_padding_free": {"padding_free": True, "packing": False, "max_length": None},
    "trl_packed": {"packing": True, "packing_strategy": "bfd"},  # max_length: seq_len, the packed rows' length
}
OTHER_BATCHES = ("trl_packed",)  # packs the whole data set into seq_len rows: not the same samples per step

log = logging.getLogger("sft_throughput")

from gpu_throughput import StepProfiler, gpu_peak_flops, share_lmlab_allocator  # noqa: E402  (this folder, beside this script)
from trl_anchor import StepClock, hf_clock, lmlab_trainer_args, peak_gib, peak_reserved_gib, require_trl  # noqa: E402

from lmlab.core.collate import IGNORE_INDEX  # noqa: E402


def real_tokens(batch: dict[str, Any]) -> torch.Tensor | int:
    """Positions that predict a token of their own sample: n - 1 for a sample of n tokens, as TRL's side counts them.

    A packed batch lists each sample's shifted length. A padded batch is shifted after padding, so a sample shorter
    than the row keeps all n positions in its attention mask (the last predicts padding) and is counted one less;
    a row whose mask reaches the end lost its last token to the shift already (exact unless a sample is exactly
    one token shorter than the row: at most one token of a batch)."""
    lengths = batch.get("document_lengths")
    if lengths is not None:
        return sum(lengths)
    mask = batch["attention_mask"]
    return mask.sum() - (mask[:, -1] == 0).sum()


class WindowTimer(L.Callback):
    """Times training batches ``warmup .. warmup + steps - 1`` (0-based) and writes what it measured to ``out`` (JSON).

    The GPU is synchronized only at the window's start and end. In between, real (non-pad) input tokens, label tokens
    and the training losses are summed on the device, and the padded tokens and lmlab's FLOPs on the host; every
    step's loss is kept (one tensor a step), for comparing runs step by step.
    """

    def __init__(self, warmup: int, steps: int, out: str):
        self.warmup, self.steps, self.out = warmup, steps, Path(out)
        self.batches = 0
        self.losses: list[torch.Tensor] = []
        self.real: torch.Tensor | int = 0
        self.labels: torch.Tensor | int = 0
        self.padded = 0
        self.flops = 0.0
        self.t0 = 0.0
        self.graphs0 = 0

    def in_window(self) -> bool:
        return self.warmup <= self.batches < self.warmup + self.steps

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(self) -> None:
        """The window opens where the step before it ended (TRL's side, StepClock, opens at the same point), so the
        first timed batch's loading and transfer are inside it on both sides."""
        self.sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.graphs0 = unique_graphs()
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup == 0:
            self.start()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.in_window():
            self.real = self.real + real_tokens(batch)
            self.labels = self.labels + (batch["labels"] != IGNORE_INDEX).sum()
            self.padded += batch["input_ids"].numel()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach().float())  # the batch's mean loss (one device, no accumulation)
        if self.in_window():
            self.flops += pl_module.flops_per_batch
        self.batches += 1
        if self.batches == self.warmup:
            self.start()
        if self.batches == self.warmup + self.steps:
            self.sync()
            elapsed = time.perf_counter() - self.t0
            self.write(elapsed)

    def write(self, elapsed: float) -> None:
        losses = torch.stack(self.losses).tolist()
        real, labels = int(self.real), int(self.labels)
        self.out.write_text(
            json.dumps(
                {
                    "elapsed_s": elapsed,
                    "steps_timed": self.steps,
                    "warmup_steps": self.warmup,
                    "real_tokens": real,
                    "label_tokens": labels,
                    "padded_tokens": self.padded,
                    "real_tokens_per_sec": real / elapsed,
                    "label_tokens_per_sec": labels / elapsed,
                    "padded_tokens_per_sec": self.padded / elapsed,
                    "steps_per_sec": self.steps / elapsed,
                    "real_share": real / self.padded,
                    "flops_per_sec": self.flops / elapsed,
                    "peak_mem_gib": peak_gib(),
                    "peak_reserved_gib": peak_reserved_gib(),
                    "graphs_compiled_in_window": unique_graphs() - self.graphs0,
                    "mean_loss_timed": statistics.fmean(losses[self.warmup :]),
                    "losses": losses,
                }
            )
        )


def unique_graphs() -> int:
    """Graphs torch.compile has built so far in this process (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def common_overrides(args: argparse.Namespace, compile_: bool) -> list[str]:
    cuda = torch.cuda.is_available()
    return [
        "stage=sft",
        f"data={args.data}",
        f"model={args.model}",
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"compile={str(compile_).lower()}",
        "logger=csv",
        f"batch_size={args.batch_size}",
        f"seq_len={args.seq_len}",
        f"lr={args.lr}",
        f"min_lr={args.min_lr}",
        f"max_steps={args.warmup + args.steps + args.profile_steps}",
        "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=0",
        "callbacks.samples.num_prompts=0",
        "checkpoint_every=1000000",
        f"tokenizer={args.tokenizer}",
        *args.override,
    ]


def random_base(args: argparse.Namespace, folder: Path) -> Path:
    """A randomly initialised ``args.model`` with the tokenizer, saved as an HF folder: the ``init_from`` of every
    configuration when adapters are compared (LoRA and QLoRA train on a saved base; memory and speed do not depend on
    the weights' values), so full fine-tuning starts from the same weights."""
    from hydra import compose, initialize_config_dir

    from lmlab.core.models import build_model, export_hf
    from lmlab.core.tokenizer import load_tokenizer

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", *[o for o in args.override if o.startswith("model.")]])
    tokenizer = load_tokenizer(args.tokenizer)
    return export_hf(build_model(cfg.model, tokenizer), tokenizer, folder)


def run_one(args: argparse.Namespace, variant: str, compile_: bool, work: Path) -> dict:
    """One configuration through train.train; the WindowTimer's measurements."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import train

    overrides = [*common_overrides(args, compile_), *VARIANTS[variant]]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={work / 'run'}"])
    timing = work / "timing.json"
    with open_dict(cfg):
        cfg.callbacks.window = {
            "_target_": f"{__name__}.WindowTimer",
            "warmup": args.warmup,
            "steps": args.steps,
            "out": str(timing),
        }
        if args.profile_steps:
            cfg.callbacks.profile = {
                "_target_": f"{StepProfiler.__module__}.StepProfiler",
                "start": args.warmup + args.steps,
                "steps": args.profile_steps,
                "out": str(work / "profile.json"),
            }
    t0 = time.perf_counter()
    train.train(cfg)
    result = json.loads(timing.read_text())
    if args.profile_steps:
        result["profile"] = json.loads((work / "profile.json").read_text())
    result["fit_wall_s"] = time.perf_counter() - t0
    result["overrides"] = overrides
    result["attn_implementation"] = cfg.model.attn_implementation
    result["align_lm_head"] = cfg.align_lm_head
    if cfg.packing:
        result["packed_attention"] = train.packed_attention(cfg)
    return result


def trl_attention(args: argparse.Namespace) -> str:
    """TRL's attention: ``--trl-attn``, else FlashAttention 2 on a GPU where the flash_attn package is installed (the
    varlen kernels TRL's padding-free batches are made for), else SDPA (transformers then masks the packed samples from
    their position ids, block-diagonal, as for lmlab's packed_mask)."""
    import importlib.util

    if args.trl_attn:
        return args.trl_attn
    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def lmlab_samples(args: argparse.Namespace, compile_: bool, work: Path) -> list[dict[str, list[int]]]:
    """The tokenized training samples lmlab's SFT datamodule builds from the composed config (``input_ids`` and the
    aligned ``labels``, -100 on the prompt), in the order its training loader draws them in the first epoch: what the
    padded and packed lmlab runs train on, for TRL to train on the same samples in the same batches."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from train import connect_data, prepare_tokenizer

    overrides = [*common_overrides(args, compile_), *VARIANTS["padded"]]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={work / 'data'}"])
    datamodule = instantiate(cfg.data)
    tokenizer = prepare_tokenizer(cfg, datamodule, work / "data", classifier=False)
    connect_data(cfg, datamodule, tokenizer)
    datamodule.setup("fit")
    order = list(datamodule.train_dataloader().sampler)
    return [{k: datamodule.train_set[i][k].tolist() for k in ("input_ids", "labels")} for i in order]


def run_trl(args: argparse.Namespace, variant: str, compile_: bool, work: Path, samples: list[dict]) -> dict:
    """TRL's SFTTrainer on ``samples`` (lmlab's, in its order) from the saved base lmlab's runs start from, configured
    like them: batch size, max steps, lr and its warmup + cosine schedule down to min_lr, AdamW betas and weight decay,
    grad clip, bf16 autocast over fp32 weights (bf16-mixed), fused AdamW (TRL's default), no gradient checkpointing
    (TRL's default is on), ``torch_compile`` as lmlab's compile, the same loader workers, pinning and pad multiple,
    ``train_sampling_strategy="sequential"`` (the samples come in lmlab's order); no eval, no saving. Measured like
    :class:`WindowTimer`: the same window of steps, real tokens (each sample's length - 1: positions predicting a token
    of their own sample, as lmlab's packed count), label and padded tokens, peak memory over the window, losses."""
    from datasets import Dataset
    from hydra import compose, initialize_config_dir
    from trl import SFTConfig, SFTTrainer

    from lmlab.core.tokenizer import load_tokenizer
    from train import loader_settings

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*common_overrides(args, compile_), f"paths.output_dir={work / 'run'}"])
    loader = loader_settings(cfg)
    end = args.warmup + args.steps
    clock = StepClock(args.warmup, end)
    counts: dict[str, Any] = {"real": 0, "labels": 0, "padded": 0, "graphs0": 0}
    losses: list[torch.Tensor] = []

    class CountingCollator:
        """TRL's collator, plus the batch's real tokens (``n_real``, popped before the model sees the batch)."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples: list[dict]) -> dict:
            out = self.inner(examples)
            lengths = [n for e in examples for n in e.get("seq_lengths", [len(e["input_ids"])])]
            out["n_real"] = torch.tensor(sum(n - 1 for n in lengths))
            return out

    class RecordingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            n_real, step = inputs.pop("n_real"), self.state.global_step
            if step == args.warmup:  # the clock synchronized at the end of the step before
                counts["graphs0"] = unique_graphs()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            if args.warmup <= step < end:  # summed on the device: no synchronization
                counts["real"] = counts["real"] + n_real
                counts["labels"] = counts["labels"] + (inputs["labels"] != IGNORE_INDEX).sum()
                counts["padded"] += inputs["input_ids"].numel()
            loss = super().training_step(model, inputs, *rest, **kwargs)
            losses.append(loss.detach().float())
            if step == end - 1:
                counts["graphs"] = unique_graphs() - counts["graphs0"]
            return loss

    settings = {
        **TRL_VARIANTS[variant],
        "bf16": cfg.trainer.precision.startswith("bf16"),
        "gradient_checkpointing": False,
        "torch_compile": compile_,
        "pad_to_multiple_of": loader["pad_to_multiple_of"] if loader["pad_to_multiple_of"] > 1 else None,
        "dataloader_num_workers": loader["num_workers"],
        "dataloader_pin_memory": loader["pin_memory"],
        "train_sampling_strategy": "sequential",
        "model_init_kwargs": {"attn_implementation": trl_attention(args), "dtype": "float32"},
    }
    if settings.get("packing"):
        settings["max_length"] = args.seq_len
    config = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=end,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": args.min_lr},
        warmup_steps=cfg.optim.warmup_steps,
        **lmlab_trainer_args(cfg),
        **settings,
    )
    trainer = RecordingSFTTrainer(
        model=str(args.base),
        args=config,
        train_dataset=Dataset.from_list(samples),
        processing_class=load_tokenizer(args.base),
        callbacks=[hf_clock(clock)],
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    t0 = time.perf_counter()
    trainer.train()
    fit_wall_s = time.perf_counter() - t0
    elapsed = clock.seconds()
    real, labels, padded = int(counts["real"]), int(counts["labels"]), counts["padded"]
    losses_ = torch.stack(losses).tolist()
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    settings["gradient_checkpointing"] = checkpointing  # what the model ended up with
    settings.update(
        optim=config.optim.value,
        padding_free_effective=trainer.padding_free,
        attn_implementation=trainer.model.config._attn_implementation,
    )
    del trainer
    return {
        "elapsed_s": elapsed,
        "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "real_tokens": real,
        "label_tokens": labels,
        "padded_tokens": padded,
        "real_tokens_per_sec": real / elapsed,
        "label_tokens_per_sec": labels / elapsed,
        "padded_tokens_per_sec": padded / elapsed,
        "steps_per_sec": args.steps / elapsed,
        "real_share": real / padded,
        "flops_per_sec": None,
        "peak_mem_gib": clock.train_peak,
        "peak_reserved_gib": clock.train_reserved,
        "graphs_compiled_in_window": counts.get("graphs", 0),
        "mean_loss_timed": statistics.fmean(losses_[args.warmup :]),
        "losses": losses_,
        "fit_wall_s": fit_wall_s,
        "trl_settings": settings,
    }


def markdown(result: dict) -> str:
    peak = result["peak_flops_bf16"]
    trl = result["versions"].get("trl")
    lines = [
        f"# SFT throughput, padded vs packed{', lmlab vs TRL SFTTrainer' if trl else ''}: {result['model']} on "
        f"{result['data']} ({result['date']})",
        "",
        (
            f"{result['device']}; torch {result['versions']['torch']}, transformers "
            f"{result['versions']['transformers']}, lightning {result['versions']['lightning']}"
            f"{f', trl {trl}' if trl else ''}; batch "
            f"{result['batch_size']} samples, seq_len {result['seq_len']}, lr {result['lr']} -> {result['min_lr']}; "
            f"{result['warmup']} warmup steps, then {result['steps']} timed steps (the same samples in every "
            f"configuration); MFU against {f'{peak:.4g}' if peak else 'n/a'} FLOP/s."
        ),
        "",
        (
            "real tok/s: non-pad input tokens a second (padded: attention_mask.sum(), which also counts the last token "
            "of each shorter sample, whose target is padding; packed: sum(document_lengths)); label tok/s: tokens "
            "with a target, the same in every configuration; vs padded: steps/s over the padded run's with the same "
            "compile setting (the same samples each step); loss vs padded: the mean training loss over the timed "
            "steps, relative (not for adapters, which train other weights); peak memory over the timed steps: "
            "allocated, and reserved by the allocator, which alone holds the pool of CUDA graphs (packed_graphs), "
            "whose replays allocate nothing; graphs in window: torch.compile graphs built during the timed steps "
            "(recompiles; not CUDA graph recordings); adapters vs full: an adapter run's steps/s and peak memory "
            "over the full fine-tune's with the same batches (all start from one saved random base: init_from)."
        ),
    ]
    if trl:
        lines += ["", TRL_NOTE, ""]
        seen = set()
        for run in result["runs"]:
            if "trl_settings" in run and run["variant"] not in seen:
                seen.add(run["variant"])
                shown = {k: v for k, v in run["trl_settings"].items() if k != "torch_compile"}
                lines.append(f"- {run['variant']}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += [
        "",
        "| config | compile | real tok/s | label tok/s | padded tok/s | steps/s | vs padded | real share | "
        "peak GiB allocated / reserved | "
        "MFU | mean loss | loss vs padded | graphs in window | adapters vs full: steps/s, peak memory | "
        "lmlab / TRL best: real tok/s, peak | lmlab / TRL same layout: real tok/s, peak |",
        "| --- | --- |" + " ---: |" * 14,
    ]
    for run in result["runs"]:
        head = f"| {run['variant']} | {run['compile']} |"
        if "error" in run:
            lines.append(f"{head} failed: {run['error'].strip().splitlines()[-1][:150]} |" + " |" * 13)
            continue
        base = next((r for r in result["runs"] if r["variant"] == "padded" and r["compile"] == run["compile"]), None)
        speedup = (
            f"{run['steps_per_sec'] / base['steps_per_sec']:.2f}x"
            if base and "error" not in base and run is not base and same_batches(run)
            else ""
        )
        full = full_run(result["runs"], run)
        vs_full = (
            f"{run['steps_per_sec'] / full['steps_per_sec']:.2f}x, {run['peak_mem_gib'] / full['peak_mem_gib']:.2f}x"
            if full and run["peak_mem_gib"]
            else ""
        )
        mfu = f"{100 * run['flops_per_sec'] / peak:.1f}%" if peak and run["flops_per_sec"] else "n/a"
        diff = run.get("loss_vs_padded", {}).get("mean_timed_rel_diff")
        loss_diff = "" if diff is None else f"{100 * diff:+.2f}%"
        mem = "n/a" if run["peak_mem_gib"] is None else f"{run['peak_mem_gib']:.2f} / {run['peak_reserved_gib']:.2f}"
        vs_trl = [
            f"{v['real_tokens_per_sec_ratio']:.2f}x ({v['trl_variant']})"
            + ("" if v["peak_mem_ratio"] is None else f", {v['peak_mem_ratio']:.2f}x / {v['peak_reserved_ratio']:.2f}x")
            if v
            else ""
            for v in (run.get("vs_trl"), run.get("vs_trl_same_layout"))
        ]
        lines.append(
            f"{head} {run['real_tokens_per_sec']:,.0f} | {run['label_tokens_per_sec']:,.0f} | "
            f"{run['padded_tokens_per_sec']:,.0f} | {run['steps_per_sec']:.2f} | {speedup} | {run['real_share']:.3f} | "
            f"{mem} | {mfu} | {run['mean_loss_timed']:.4f} | {loss_diff} | {run['graphs_compiled_in_window']} | "
            f"{vs_full} | {vs_trl[0]} | {vs_trl[1]} |"
        )
    return "\n".join(lines) + "\n"


TRL_NOTE = (
    "TRL anchor: SFTTrainer (trl_*) on lmlab's tokenized samples in lmlab's order (input_ids and labels, so the same "
    "tokens and loss mask), from the same saved random base, with lmlab's batch size, steps, lr schedule, AdamW "
    "betas and weight decay, grad clip, precision, compile setting, loader workers and pad multiple; its real tokens "
    "are each sample's length - 1 (as lmlab's packed count). trl_padded and trl_padding_free train the same batches as "
    "lmlab's runs (their loss vs padded checks it); trl_packed packs the data set into seq_len rows (best-fit "
    "decreasing), batch_size rows a step, so it trains other batches. lmlab / TRL best: over the fastest TRL run "
    "(real tok/s) with the same compile setting; same layout: padded over trl_padded, packed over trl_padding_free. "
    "TRL settings per run:"
)


def same_batches(run: dict) -> bool:
    """Whether the run trains the padded run's weights on its batches (not adapters, not TRL's packed rows)."""
    return not run["variant"].endswith(ADAPTED) and run["variant"] not in OTHER_BATCHES


def trl_best(runs: list[dict], compile_: bool) -> dict | None:
    """The TRL run with the most real tokens/s among those with this compile setting: the anchor lmlab is held to."""
    done = [r for r in runs if r["variant"] in TRL_VARIANTS and r["compile"] == compile_ and "error" not in r]
    return max(done, key=lambda r: r["real_tokens_per_sec"], default=None)


def compare_trl(runs: list[dict]) -> None:
    """Per lmlab run (full fine-tuning), its real tokens/s and peak memory over TRL's best run with the same compile
    setting (``vs_trl``), and over TRL's run that feeds the model the same way (padded: trl_padded, packed:
    trl_padding_free, the same samples a step)."""
    for run in runs:
        if run["variant"] in TRL_VARIANTS or "error" in run or run["variant"].endswith(ADAPTED):
            continue
        twin = "trl_padded" if run["variant"] == "padded" else "trl_padding_free"
        for key, other in (
            ("vs_trl", trl_best(runs, run["compile"])),
            (
                "vs_trl_same_layout",
                next((r for r in runs if r["variant"] == twin and r["compile"] == run["compile"]), None),
            ),
        ):
            if other is None or "error" in other:
                continue
            run[key] = {
                "trl_variant": other["variant"],
                "real_tokens_per_sec_ratio": run["real_tokens_per_sec"] / other["real_tokens_per_sec"],
                "peak_mem_ratio": run["peak_mem_gib"] / other["peak_mem_gib"] if run["peak_mem_gib"] else None,
                "peak_reserved_ratio": (
                    run["peak_reserved_gib"] / other["peak_reserved_gib"] if run.get("peak_reserved_gib") else None
                ),
            }


def full_run(runs: list[dict], run: dict) -> dict | None:
    """For an adapter run (``packed_lora``), the full fine-tune with the same batches and compile setting
    (``packed``; ``padded`` for a padded one), if it ran; None for a full fine-tune."""
    layout, _, adapters = run["variant"].partition("_")
    if adapters not in ADAPTED:
        return None
    name = "padded" if layout == "padded" else "packed"
    full = next((r for r in runs if r["variant"] == name and r["compile"] == run["compile"]), None)
    return full if full and "error" not in full else None


def compare_losses(runs: list[dict]) -> None:
    """Per run, its losses against the padded run's with the same compile setting: mean over the timed steps and
    the largest step-wise difference, relative (packing is exact, so these are bf16 noise)."""
    for run in runs:
        base = next((r for r in runs if r["variant"] == "padded" and r["compile"] == run["compile"]), None)
        if run is base or base is None or "error" in run or "error" in base or not same_batches(run):
            continue  # adapters train other weights, trl_packed other batches: their losses differ by design
        run["loss_vs_padded"] = {
            "mean_timed_rel_diff": run["mean_loss_timed"] / base["mean_loss_timed"] - 1,
            "first_step_rel_diff": run["losses"][0] / base["losses"][0] - 1,
            "max_step_rel_diff": max(abs(a / b - 1) for a, b in zip(run["losses"], base["losses"], strict=True)),
            "same_label_tokens": run["label_tokens"] == base["label_tokens"],
        }


def save(result: dict, out: Path) -> None:
    gpu = re.search(r"\b([A-Z]\d{2,4})\b", result["device"])
    asked = result["variants"]  # not the runs so far: one name from the first configuration to the last
    kind = (
        "sft_adapters"
        if any(v.endswith(ADAPTED) for v in asked)
        else "sft_trl"
        if any(v in TRL_VARIANTS for v in asked)
        else "sft_packing"
    )
    stem = f"{result['date']}_{gpu.group(1).lower() if gpu else 'cpu'}_{kind}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    log.info("wrote %s.{json,md} in %s", stem, out)


def fresh() -> None:
    """Forget the last configuration's compiled graphs and cached GPU memory."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama", help="conf/model preset (llama: 246M at vocab 6400)")
    parser.add_argument("--data", default="zh_alpaca", help="conf/data SFT preset")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder (the run's tokenizer=)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak lr (the llama_matelike_sft recipe's)")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor (the recipe's)")
    parser.add_argument("--warmup", type=int, default=25, help="untimed steps first, compilation included")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="then N more steps of each lmlab run under torch.profiler (its fit wall time then includes them)",
    )
    every = [*VARIANTS, *TRL_VARIANTS]
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(every)} (default: all)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="extra Hydra override")
    parser.add_argument(
        "--trl-attn",
        help="TRL's attn_implementation (default: flash_attention_2 where flash_attn is installed, else sdpa)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check: llama-tiny, batch 4, 1 + 3 steps; padded, packed and the TRL runs unless --variants",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch_size, args.warmup, args.steps, args.compile = "llama-tiny", 4, 1, 3, "off"
        args.variants = args.variants or "padded,packed,trl_padded,trl_padding_free,trl_packed"
    variants = (args.variants or ",".join(every)).split(",")
    unknown = set(variants) - set(every)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    trl = [v for v in variants if v in TRL_VARIANTS]
    if trl:
        require_trl("sft_throughput.py", f"; or leave out the anchor: --variants without {', '.join(TRL_VARIANTS)}")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    args.base = None
    if trl or any(v.endswith(ADAPTED) for v in variants):  # every configuration starts from one saved base
        args.base = random_base(args, Path(tempfile.mkdtemp(prefix="lmlab_sft_bench_")))
        args.override.append(f"init_from={args.base}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    allocator = share_lmlab_allocator(["stage=sft", f"data={args.data}", f"model={args.model}", *args.override])

    import transformers

    result = {
        "model": args.model,
        "cuda_alloc_conf": allocator,
        "data": args.data,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": L.__version__,
            "python": sys.version.split()[0],
        },
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "min_lr": args.min_lr,
        "warmup": args.warmup,
        "steps": args.steps,
        "command": " ".join(sys.argv),
        "variants": variants,
        "peak_flops_bf16": gpu_peak_flops(),
        "runs": [],
    }
    if trl:
        import trl as trl_module

        result["versions"]["trl"] = trl_module.__version__
        result["trl_attn_implementation"] = trl_attention(args)
    samples: list[dict] = []  # lmlab's training samples in its order, for TRL (the same with either compile setting)
    for compile_ in compiles:
        for variant in variants:
            if not compile_ and any(o.startswith("compile=") for o in VARIANTS.get(variant, ())):
                continue  # a variant with its own compile mode runs in the compiled pass only
            log.info("%s, compile=%s", variant, compile_)
            fresh()
            run: dict = {"variant": variant, "compile": compile_}
            try:
                with tempfile.TemporaryDirectory(prefix="lmlab_sft_bench_") as tmp:
                    if variant in TRL_VARIANTS:
                        samples = samples or lmlab_samples(args, compile_, Path(tmp))
                        run.update(run_trl(args, variant, compile_, Path(tmp), samples))
                    else:
                        run.update(run_one(args, variant, compile_, Path(tmp)))
            except Exception:  # recorded, and the other configurations still run
                run["error"] = traceback.format_exc()
                log.error("%s, compile=%s failed:\n%s", variant, compile_, run["error"])
            result["runs"].append(run)
            compare_losses(result["runs"])
            compare_trl(result["runs"])
            save(result, out)
    print(json.dumps({**result, "runs": [{k: v for k, v in r.items() if k != "losses"} for r in result["runs"]]}))
    print(markdown(result))


if __name__ == "__main__":
    main()
