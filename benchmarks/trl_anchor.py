"""What the benchmarks that run a TRL trainer as their anchor share (dpo_throughput.py, sft_throughput.py).

TRL is an optional benchmark dependency (``pip install -e ".[bench]"``): :func:`require_trl` stops with a clear
message when it is missing. :class:`StepClock` times training steps the same way on either side of a comparison,
fed by a Lightning callback or by :class:`HFClock`, a TrainerCallback for TRL's (Hugging Face) trainers.
"""

from __future__ import annotations

import time
from typing import Any

import torch

TRL_MIN = "1.16"


def require_trl(script: str, skip_hint: str = "") -> None:
    """Exit with a clear message when trl (or datasets, which TRL's trainers take their data in) is missing."""
    import importlib

    try:
        for name in ("trl", "datasets"):  # trl first: its absence is the one to name
            importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(
            f"{script}: its anchor is TRL, which is not installed here ({e}). Install the benchmark extra: "
            f'pip install -e ".[bench]" (trl>={TRL_MIN}, datasets){skip_hint}'
        ) from e


def lmlab_trainer_args(cfg: Any) -> dict[str, Any]:
    """The TrainingArguments an anchor takes from lmlab's composed run config ``cfg``, so both sides step alike:
    AdamW's betas and weight decay, gradient clipping, the log interval and seed; and a trainer that only trains
    (no eval, no saving, no reporting, no progress bar)."""
    return {
        "adam_beta1": cfg.optim.optimizer.betas[0],
        "adam_beta2": cfg.optim.optimizer.betas[1],
        "weight_decay": cfg.optim.weight_decay,
        "max_grad_norm": cfg.trainer.gradient_clip_val,
        "logging_steps": cfg.trainer.log_every_n_steps,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": cfg.seed,
    }


def cuda() -> bool:
    return torch.cuda.is_available()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda() else None


def peak_reserved_gib() -> float | None:
    """The allocator's peak reserved memory: unlike the allocated peak it holds the memory pool of CUDA graphs
    (compile=reduce-overhead), whose replays allocate nothing."""
    return torch.cuda.max_memory_reserved() / 2**30 if cuda() else None


def memory_pools() -> list[dict] | None:
    """The CUDA allocator's segments now, summed by pool: reserved and allocated GiB each. The default pool's id is
    (0, 0); CUDA graphs allocate from pools of their own, which the allocated peak does not see during replays, so
    this shows how a reserved peak splits between what every step keeps (the default pool: parameters, optimizer
    state) and the graphs' memory."""
    if not cuda():
        return None
    pools: dict[tuple, dict] = {}
    # _snapshot: every pool's segments (the public memory_snapshot() takes a pool id, (0, 0) by default since 2.13)
    for segment in torch.cuda.memory._snapshot()["segments"]:
        key = tuple(segment["segment_pool_id"])
        pool = pools.setdefault(key, {"pool": str(key), "segments": 0, "reserved_gib": 0.0, "allocated_gib": 0.0})
        pool["segments"] += 1
        pool["reserved_gib"] += segment["total_size"] / 2**30
        pool["allocated_gib"] += segment["allocated_size"] / 2**30
    return [pools[key] for key in sorted(pools)]


class StepClock:
    """Wall time from the end of step ``warmup`` to the end of step ``steps`` (GPU synchronized at both),
    peak memory before and during training, the allocator's pools at the last step (memory_pools), and the padded
    width of every training batch."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.times: dict[int, float] = {}
        self.setup_peak = self.train_peak = self.train_reserved = self.pools = None
        self.widths: list[int] = []

    def train_start(self) -> None:
        self.setup_peak = peak_gib()
        if cuda():
            torch.cuda.reset_peak_memory_stats()

    def step_end(self, step: int) -> None:
        if step in (self.warmup, self.steps):
            if cuda():
                torch.cuda.synchronize()
            self.times[step] = time.perf_counter()
            self.train_peak, self.train_reserved = peak_gib(), peak_reserved_gib()
            if step == self.steps:
                self.pools = memory_pools()

    def seconds(self) -> float:
        """The timed window's wall time: from the end of step ``warmup`` to the end of step ``steps``."""
        assert set(self.times) == {self.warmup, self.steps}, f"timed steps {sorted(self.times)}, expected both ends"
        return self.times[self.steps] - self.times[self.warmup]

    def result(self, batch_size: int) -> dict:
        seconds = self.seconds()
        timed = self.steps - self.warmup
        return {
            "pairs_per_sec": timed * batch_size / seconds,
            "step_ms": 1e3 * seconds / timed,
            "steps_timed": timed,
            "peak_setup_gib": self.setup_peak,
            "peak_train_gib": self.train_peak,
            "peak_reserved_train_gib": self.train_reserved,
            "memory_pools_at_end": self.pools,
            "mean_batch_width": sum(self.widths) / len(self.widths),
            "batches": len(self.widths),
        }


def hf_clock(clock: StepClock):
    """A transformers TrainerCallback feeding ``clock`` (imported here: transformers is needed only with TRL)."""
    from transformers import TrainerCallback

    class HFClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs) -> None:
            clock.train_start()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            clock.step_end(state.global_step)

    return HFClock()
