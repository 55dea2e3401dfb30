"""Training throughput of an lmlab causal preset against a raw torch.compile'd Hugging Face loop of the same model.

Both run in one process, one after the other, on the same shapes (default: GPT-2 small, 124M parameters,
vocab 50257, batch 16 x 1024 tokens; ``--preset llama --batch-size 32 --seq-len 512``: the 246M LLaMA at
vocab 6400), bf16 autocast, fused AdamW, grad clip 1.0, the preset's dropout (0 in the gpt2 and llama presets):

(a) raw: the model lmlab's ``build_model`` makes from the preset (e.g. ``GPT2LMHeadModel`` with SDPA attention),
    ``model.compile(mode=--raw-compile-mode)``, ``loss = model(x, labels=x).loss`` on random token ids already on
    the GPU; ``--warmup`` untimed steps (compilation), then ``--steps`` steps timed with CUDA events around the
    whole loop (no per-step sync). ``--raw-compile-mode reduce-overhead`` gives the anchor CUDA graphs too, to
    set against ``--lmlab-override compile=reduce-overhead``.
(b) lmlab: ``train.train(cfg)`` on the config ``python train.py model=<preset> trainer=gpu compile=true
    logger=csv`` composes, reading a synthetic corpus through the real datamodule (memmap windows,
    4 workers) with a synthetic word-level tokenizer of the vocabulary size, so the model has the anchor's shape.
    Tokens/s and MFU come from the ``TokenThroughputMonitor`` rows of ``metrics.csv`` (each the rate
    over a window of timings, one per log step, host-synced only there): the median of the rows whose
    window holds no warmup step.
    It runs ``warmup + window + steps`` steps; validation, sample generations and periodic
    checkpoints are off; ``--lmlab-override`` adds Hydra overrides (recorded in the output).
(c) with ``--kernels-ablation`` (a LLaMA-family preset, Liger-Kernel installed): lmlab again with Liger's
    kernels added one at a time, cumulatively (``kernels.rope``, then ``rms_norm``, ``swiglu``, and without
    compile ``fused_linear_cross_entropy``, which does not run under it). Liger patches transformers' modeling
    module for the rest of the process (lmlab.core.kernels), so a kernel once on stays on, and each row's config
    names every kernel it ran.

(d) with ``--profile-steps N``: N more steps a side under torch.profiler (CPU and CUDA activity), after the timed
    ones (lmlab: a callback, StepProfiler, the steps after the throughput rows, which leave them out): wall ms per
    step, the GPU's kernel ms per step (self device time of every kernel and copy) and the kernels whose time a step
    differs most between the sides, to tell whether lmlab's extra time is work on the GPU or the GPU waiting.

MFU on both sides is ``lmlab.core.models.flops_per_token`` (6N + 12*L*d*T) x tokens/s over the GPU's dense
bf16 peak from conf/callbacks/default.yaml (``callbacks.throughput.peak_bf16_flops``), as lmlab logs it. Peak
memory is ``torch.cuda.max_memory_allocated``, reset between the sides. Prints a JSON object and a markdown
table and writes both as ``<date>_<gpu>_<preset>_throughput.{json,md}`` into ``$OUT`` if set, else the current
folder (``benchmarks/results/`` keeps the ones worth keeping).

    python benchmarks/gpu_throughput.py                 # GPU: warmup 30, 300 timed steps a side
    python benchmarks/gpu_throughput.py --smoke         # CPU check: gpt2-tiny, seq 64, batch 4, no compile
    python benchmarks/gpu_throughput.py --preset llama --batch-size 32 --seq-len 512 --kernels-ablation
    python benchmarks/gpu_throughput.py --preset llama --batch-size 32 --seq-len 512 --profile-steps 20

On a machine without hydra-core/omegaconf/torchdata, install them first (the repo's train.py needs them).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

GPT2_VOCAB = 50257  # the GPT-2 vocabulary size: the default for gpt2* presets
PRESET_VOCAB = 6400  # lmlab's byte BPE (conf/bpe/byte.yaml): the default for other presets
SPECIALS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "unk": "<|unk|>"}
ABLATION = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")  # --kernels-ablation's order (cumulative)
WORDS_PER_DOC = 3000

log = logging.getLogger("gpu_throughput")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` entries ("w0", "w1", ... plus the specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    vocab = {w: i for i, w in enumerate([*words, *SPECIALS.values()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS["eos"],
        eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
    )
    assert len(fast) == vocab_size, len(fast)
    fast.save_pretrained(folder)


def write_corpus(path: Path, tokens: int, vocab_size: int, seed: int = 0) -> None:
    """One document per line of WORDS_PER_DOC random words: about ``tokens`` tokens (1 word = 1 token)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab_size - len(SPECIALS))])
    with open(path, "w") as f:
        f.writelines(
            " ".join(words[rng.integers(0, len(words), WORDS_PER_DOC)]) + "\n"
            for _ in range(math.ceil(tokens / WORDS_PER_DOC))
        )


def share_lmlab_allocator(overrides: list[str]) -> str | None:
    """Set lmlab's CUDA allocator settings (``cuda_alloc_conf`` under ``trainer=gpu`` and the side's ``overrides``, its
    stage and model among them) for the whole
    process before anything starts CUDA, so both sides of a comparison run under them: the allocator reads them once a
    process (train.set_allocator). Returns the settings in force (None: torch's own, or no GPU)."""
    if not torch.cuda.is_available():
        return None
    from hydra import compose, initialize_config_dir

    from train import set_allocator

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return set_allocator(compose("train", overrides=["trainer=gpu", *overrides]))


def gpu_peak_flops() -> float | None:
    """The peak lmlab's TokenThroughputMonitor divides by in a bf16 run on this GPU (None on the CPU)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    if not torch.cuda.is_available():
        return None
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        monitor = instantiate(compose("train").callbacks.throughput)
    return monitor.peak_flops or monitor.table_peak(torch.device("cuda"), "bf16-mixed")


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def profile_summary(prof, steps: int, wall_s: float, top: int = 25) -> dict:
    """A torch.profiler run of ``steps`` training steps that took ``wall_s``: per step, wall ms, the GPU's busy ms (the
    self device time of its kernels and copies) and the ``top`` device events and host functions by time."""
    events = prof.key_averages()
    kernels = (e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0)
    # kernels and copies: neither the ops launching them nor the spans of annotations (Optimizer.step#AdamW.step, whose
    # span on the GPU holds lmlab's whole forward and backward: Lightning runs them in the optimizer's closure)
    device = sorted((e for e in kernels if not e.is_user_annotation), key=lambda e: -e.self_device_time_total)
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    busy_us = sum(e.self_device_time_total for e in device)
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "device_busy_ms_per_step": busy_us / 1e3 / steps,
        "device": {e.key[:120]: [e.self_device_time_total / 1e3 / steps, e.count / steps] for e in device[:top]},
        "host": {e.key[:120]: e.self_cpu_time_total / 1e3 / steps for e in host[:top]},
        "device_all_ms": {e.key[:120]: e.self_device_time_total / 1e3 / steps for e in device},
    }


def profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepProfiler(L.Callback):
    """Lightning callback (added to the lmlab run by --profile-steps): torch.profiler over the ``steps`` training steps
    from ``start`` (0-based global steps), its profile_summary written as JSON to ``out``."""

    def __init__(self, start: int, steps: int, out: str):
        self.start, self.steps, self.out = start, steps, Path(out)
        self.prof, self.t0 = None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.start and self.prof is None:
            sync()
            self.prof = profiler().__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.prof is not None and trainer.global_step == self.start + self.steps:
            sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.out.write_text(json.dumps(profile_summary(self.prof, self.steps, wall)))
            self.prof = None


def compose_config(args: argparse.Namespace, work: Path, max_steps: int, extra: Sequence[str] = ()):
    """The config ``python train.py <lmlab_overrides>`` composes."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=lmlab_overrides(args, work, max_steps, extra))


def run_raw(args: argparse.Namespace, work: Path, steps: int) -> dict:
    """The anchor: a plain compiled HF training loop of the model lmlab builds from the preset, on random ids."""
    from transformers import AutoTokenizer

    from lmlab.core.models import build_model, count_parameters, flops_per_token

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = build_model(compose_config(args, work, 0).model, AutoTokenizer.from_pretrained(work / "tokenizer"))
    model.to(device).train()
    if args.compile:
        model.compile(mode=args.raw_compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(0, args.vocab_size, shape, device=device) for _ in range(8)]

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    if cuda:
        end.record()
        torch.cuda.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
    else:
        elapsed = time.perf_counter() - t0
    tokens_per_sec = steps * args.batch_size * args.seq_len / elapsed
    final_loss = loss.item()  # now: under CUDA graphs the profiled steps' replays overwrite it
    profiled = None
    if args.profile_steps:
        sync()
        with profiler() as prof:
            t0 = time.perf_counter()
            for i in range(args.profile_steps):
                step(batches[i % len(batches)])
            sync()
            wall = time.perf_counter() - t0
        profiled = profile_summary(prof, args.profile_steps, wall)
    peak = gpu_peak_flops()
    return {
        "profile": profiled,
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops_per_token(model, args.seq_len) * tokens_per_sec / peak if peak else None,
        "peak_mem_gib": peak_gib(),
        "steps_timed": steps,
        "warmup_steps": args.warmup,
        "warmup_s": warmup_s,
        "step_ms": 1e3 * elapsed / steps,
        "final_loss": final_loss,
        "parameters": count_parameters(model),
        "flops_per_token": flops_per_token(model, args.seq_len),
        "config": model.config.to_dict(),
    }


def lmlab_overrides(args: argparse.Namespace, work: Path, max_steps: int, extra: Sequence[str] = ()) -> list[str]:
    cuda = torch.cuda.is_available()
    return [
        f"model={args.preset}",
        f"trainer={'gpu' if cuda else 'cpu'}",
        f"compile={str(args.compile).lower()}",
        "logger=csv",
        f"batch_size={args.batch_size}",
        f"seq_len={args.seq_len}",
        f"max_steps={max_steps}",
        "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=0",
        "callbacks.samples.num_prompts=0",
        "checkpoint_every=1000000",
        f"tokenizer={work / 'tokenizer'}",
        f"data.train_files=[{work / 'train.txt'}]",
        f"data.val_files=[{work / 'val.txt'}]",
        f"paths.output_dir={work / 'run'}",
        f"paths.cache_dir={work / 'cache'}",
        *args.lmlab_override,
        *extra,
    ]


def run_lmlab(args: argparse.Namespace, work: Path, raw_config: dict, extra: Sequence[str] = ()) -> dict:
    """lmlab's own training entry point on the composed config (plus ``extra`` overrides), in ``work/run``;
    throughput from metrics.csv. Its model must have the raw loop's shape (``raw_config``)."""
    import shutil

    import train

    cfg = compose_config(args, work, 0, extra)
    # A row logged at (0-based) step s is the rate over the `span` steps s-span+1..s (window timings, one per log
    # step); the first row with no warmup step in it:
    window = cfg.callbacks.throughput.window_size
    span = (window - 1) * cfg.trainer.log_every_n_steps
    first_step = args.warmup + span - 1
    max_steps = args.warmup + span + args.steps
    profile_start, profile_out = max_steps, work / "profile.json"
    if args.profile_steps:  # after the timed steps; their rows are left out below
        extra = [
            *extra,
            "+callbacks.step_profiler._target_=gpu_throughput.StepProfiler",
            f"+callbacks.step_profiler.start={profile_start}",
            f"+callbacks.step_profiler.steps={args.profile_steps}",
            f"+callbacks.step_profiler.out={profile_out}",
        ]
        max_steps += args.profile_steps + 1
    cfg = compose_config(args, work, max_steps, extra)
    shutil.rmtree(work / "run", ignore_errors=True)  # the last run's folder: this run starts fresh
    # Enough training text for every step without a second epoch (whose start would save last.ckpt).
    tokens = int(1.1 * max_steps * args.batch_size * (args.seq_len + 1)) + WORDS_PER_DOC
    write_corpus(work / "train.txt", tokens, args.vocab_size)
    write_corpus(work / "val.txt", 2 * WORDS_PER_DOC, args.vocab_size, seed=1)

    if torch.cuda.is_available():  # this run's peak, not an earlier run's in the process
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train.train(cfg)
    fit_s = time.perf_counter() - t0

    hf = json.loads((work / "run" / "hf" / "config.json").read_text())
    shape_keys = [k for k in cfg.model.config if k != "_target_"] + ["vocab_size"]
    shape, expected = ({k: c.get(k) for k in shape_keys} for c in (hf, raw_config))
    assert shape == expected, f"lmlab built {shape}, the raw loop {expected}"

    with open(work / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    all_rows = [
        {
            "step": int(r["step"]),
            "tokens_per_sec": float(r["train/device/items_per_sec"]),
            "mfu": float(r["train/device/mfu"]) if r.get("train/device/mfu") else None,
        }
        for r in rows
        if r.get("train/device/items_per_sec")
    ]
    timed = [r for r in all_rows if first_step <= r["step"] < profile_start]
    assert timed, f"no throughput rows at step >= {first_step} in metrics.csv: {all_rows}"
    mfus = [r["mfu"] for r in timed if r["mfu"] is not None]
    return {
        "profile": json.loads(profile_out.read_text()) if args.profile_steps else None,
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gib": peak_gib(),
        "steps_timed": timed[-1]["step"] - timed[0]["step"] + span,
        "rows_used": len(timed),
        "rows_first_step": timed[0]["step"],
        "rows_last_step": timed[-1]["step"],
        "window_steps": span,
        "log_every_n_steps": cfg.trainer.log_every_n_steps,
        "max_steps": max_steps,
        "fit_wall_s": fit_s,
        "optimizer_fused": bool(cfg.optim.optimizer.fused),
        "cudnn_sdpa": cfg.cudnn_sdpa,
        "align_lm_head": cfg.align_lm_head,
        "kernels": [k for k, on in cfg.kernels.items() if on],
        "overrides": lmlab_overrides(args, Path("<tmp>"), max_steps, extra),
        "first_losses": [losses[s] for s in sorted(losses)[:5]],  # same seed and data: kernels must not move them
        "rows": all_rows,
    }


def markdown(result: dict) -> str:
    raw, lm = result["raw"], result.get("lmlab")

    def row(name: str, side: dict) -> str:
        mfu = "n/a" if side["mfu"] is None else f"{100 * side['mfu']:.1f}%"
        mem = "n/a" if side["peak_mem_gib"] is None else f"{side['peak_mem_gib']:.2f}"
        ratio = side["tokens_per_sec"] / raw["tokens_per_sec"]
        return f"| {name} | {side['tokens_per_sec']:,.0f} | {mfu} | {mem} | {side['steps_timed']} | {ratio:.3f} |"

    precision = "bf16 autocast, fused AdamW" if result["device"] != "cpu" else "fp32, AdamW"
    peak = f"{result['peak_flops_bf16']:.4g}" if result["peak_flops_bf16"] else "n/a"
    mode = result.get("raw_compile_mode")
    raw_mode = f" (raw loop: mode {mode})" if mode not in (None, "default") else ""
    lines = [
        f"# {result['preset']} training throughput: lmlab vs raw compiled HF loop ({result['date']})",
        "",
        (
            f"{result['device']}; torch {result['versions']['torch']}, "
            f"transformers {result['versions']['transformers']}, "
            f"lightning {result['versions']['lightning']}; batch {result['batch_size']} x {result['seq_len']} tokens, "
            f"{precision}, compile={result['compile']}{raw_mode}; MFU against {peak} FLOP/s."
        ),
        "",
        "| side | tokens/s | MFU | peak GiB | steps timed | / raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        row("raw HF loop", raw),
    ]
    if lm:
        lines.append(row("lmlab", lm))
        for side in result.get("ablation", []):
            lines.append(row(f"lmlab + Liger {' + '.join(side['kernels'])}", side))
        if result["lmlab_extra_overrides"]:
            lines += ["", f"lmlab ran with extra overrides: `{' '.join(result['lmlab_extra_overrides'])}`."]
        multiple = lm.get("align_lm_head")
        if multiple and result["vocab_size"] % multiple:
            lines += [
                "",
                f"lmlab's LM head computes its {result['vocab_size']} logits from rows padded to a multiple of "
                f"{multiple} (`align_lm_head`); the raw loop runs the plain head.",
            ]
        first = lm["rows_first_step"] - lm["window_steps"] + 1
        lines += [
            "",
            (
                f"lmlab / raw tokens/s: **{result['ratio_tokens_per_sec']:.3f}** (lmlab: median of "
                f"{lm['rows_used']} metrics.csv rows, each over {lm['window_steps']} steps, covering "
                f"(0-based) steps {first}-{lm['rows_last_step']} of {lm['max_steps']}; raw: one CUDA-event "
                f"span over {raw['steps_timed']} steps after {raw['warmup_steps']} warmup steps)"
            ),
        ]
        for side in [lm, *result.get("ablation", [])]:
            name = " + ".join(side["kernels"]) or "no kernels"
            losses = ", ".join(f"{x:.4f}" for x in side["first_losses"])
            lines.append(f"- first logged train losses, {name}: {losses}")
    if raw.get("profile") and lm and lm.get("profile"):
        lines += profile_markdown(raw["profile"], lm["profile"])
    return "\n".join(lines) + "\n"


def profile_markdown(raw: dict, lm: dict, top: int = 12) -> list[str]:
    """The two sides' profiles: wall and GPU-busy ms per step, and the device events whose ms per step differ most."""
    lines = [
        "",
        f"torch.profiler, {raw['steps']} steps a side (its own overhead included):",
        "",
        "| side | wall ms/step | GPU busy ms/step | GPU idle ms/step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, side in (("raw HF loop", raw), ("lmlab", lm)):
        wall, busy = side["wall_ms_per_step"], side["device_busy_ms_per_step"]
        lines.append(f"| {name} | {wall:.2f} | {busy:.2f} | {wall - busy:.2f} |")
    keys = set(raw["device_all_ms"]) | set(lm["device_all_ms"])
    diff = {k: lm["device_all_ms"].get(k, 0.0) - raw["device_all_ms"].get(k, 0.0) for k in keys}
    lines += ["", "| device event | raw ms/step | lmlab ms/step | lmlab - raw |", "| --- | ---: | ---: | ---: |"]
    for k in sorted(keys, key=lambda k: -abs(diff[k]))[:top]:
        r, m = raw["device_all_ms"].get(k, 0.0), lm["device_all_ms"].get(k, 0.0)
        lines.append(f"| `{k[:80]}` | {r:.3f} | {m:.3f} | {diff[k]:+.3f} |")
    return lines


def save(result: dict, out: Path) -> None:
    """The JSON and the table, rewritten after each part so a cut-off run keeps what it measured."""
    gpu = re.search(r"\b([A-Z]\d{2,4})\b", result["device"])
    stem = f"{result['date']}_{gpu.group(1).lower() if gpu else 'cpu'}_{result['preset']}_throughput"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    log.info("wrote %s.{json,md} in %s", stem, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=300, help="timed steps (raw); steps after warmup + throughput window (lmlab)"
    )
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first, compilation included")
    parser.add_argument("--preset", default="gpt2", help="a causal conf/model preset (e.g. llama, llama-26m)")
    parser.add_argument("--vocab-size", type=int, help=f"default {GPT2_VOCAB} for gpt2 presets, else {PRESET_VOCAB}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--kernels-ablation",
        action="store_true",
        help=f"lmlab again with Liger's kernels added one at a time ({', '.join(ABLATION)}); CUDA + liger-kernel",
    )
    parser.add_argument(
        "--lmlab-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for the lmlab run (repeatable), e.g. optim.optimizer.fused=false",
    )
    parser.add_argument(
        "--raw-compile-mode",
        default="default",
        help="torch.compile mode of the raw loop (default, reduce-overhead, max-autotune, ...)",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="N more steps a side under torch.profiler (0: none)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU check: gpt2-tiny, seq 64, batch 4, no compile")
    args = parser.parse_args()
    args.compile = torch.cuda.is_available()
    if args.smoke:
        args.preset = "gpt2-tiny" if args.preset == "gpt2" else args.preset
        args.compile, args.seq_len, args.batch_size, args.warmup, args.steps = False, 64, 4, 2, 10
    if args.vocab_size is None:
        args.vocab_size = GPT2_VOCAB if args.preset.startswith("gpt2") else PRESET_VOCAB
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_SILENT", "true")
    out = Path(os.environ.get("OUT") or ".")
    allocator = share_lmlab_allocator([f"model={args.preset}", *args.lmlab_override])

    import lightning
    import transformers

    result = {
        "preset": args.preset,
        "command": " ".join(["benchmarks/gpu_throughput.py", *sys.argv[1:]]),
        "cuda_alloc_conf": allocator,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lightning": lightning.__version__,
            "python": sys.version.split()[0],
        },
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "compile": args.compile,
        "raw_compile_mode": args.raw_compile_mode if args.compile else None,
        "lmlab_extra_overrides": args.lmlab_override,
        "peak_flops_bf16": gpu_peak_flops(),
    }
    torch.set_float32_matmul_precision("high")  # as train.train sets it

    def fresh() -> None:
        gc.collect()
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory(prefix="lmlab_bench_") as tmp:
        work = Path(tmp)
        write_tokenizer(work / "tokenizer", args.vocab_size)
        log.info("raw HF loop: %s", vars(args))
        fresh()
        result["raw"] = run_raw(args, work, args.steps)
        log.info("raw: %s", {k: v for k, v in result["raw"].items() if k != "config"})
        save(result, out)

        fresh()
        result["lmlab"] = run_lmlab(args, work, result["raw"]["config"])
        result["ratio_tokens_per_sec"] = result["lmlab"]["tokens_per_sec"] / result["raw"]["tokens_per_sec"]
        save(result, out)

        if args.kernels_ablation:
            # Liger's fused loss does not run under compile (lmlab.core.kernels refuses it): the last row is eager only
            kernels = ABLATION[:-1] if args.compile else ABLATION
            result["ablation"] = []
            for i in range(len(kernels)):
                fresh()
                extra = [f"kernels.{k}=true" for k in kernels[: i + 1]]
                result["ablation"].append(run_lmlab(args, work, result["raw"]["config"], extra))
                save(result, out)

    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
