"""Host time per training step that lmlab's loop adds to a raw loop, on a model so small its compute is negligible.

On a GPU the kernels of a step run asynchronously while the host prepares the next, so the host's own work per step
(Lightning's loop and hooks, logging, lmlab's bookkeeping) is hidden unless something makes the host wait; on the
H200 lmlab's pretraining step cost the raw loop's plus ~7 ms (results/2026-12-01_h200_fast_path.md). This measures
that host work on the CPU: benchmarks/gpu_throughput.py's raw loop and lmlab run (same code, same process) on a
1-layer LLaMA of width 8 at vocab 64, batch 1 x 8 tokens, fp32, no compile; the difference of their ms per step
is lmlab's per-step host overhead on this machine.

    python benchmarks/loop_overhead.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402  (this folder's: the raw loop and the lmlab run)

TINY = [  # conf/model/llama-tiny.yaml shrunk until the matmuls cost next to nothing
    "model.config.hidden_size=8",
    "model.config.intermediate_size=8",
    "model.config.num_attention_heads=1",
    "model.config.num_key_value_heads=1",
    "model.config.num_hidden_layers=1",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="timed steps a side")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(
        preset="llama-tiny",
        compile=False,
        seq_len=8,
        batch_size=1,
        warmup=20,
        steps=cli.steps,
        lmlab_override=[*TINY, "optim.optimizer.fused=false"],
        vocab_size=64,
        kernels_ablation=False,
        profile_steps=0,
    )
    with tempfile.TemporaryDirectory(prefix="lmlab_overhead_") as tmp:
        work = Path(tmp)
        gpu_throughput.write_tokenizer(work / "tokenizer", args.vocab_size)
        raw = gpu_throughput.run_raw(args, work, args.steps)
        lmlab = gpu_throughput.run_lmlab(args, work, raw["config"])
    tokens = args.batch_size * args.seq_len
    lmlab_ms = 1e3 * tokens / lmlab["tokens_per_sec"]
    result = {
        "raw_ms_per_step": raw["step_ms"],
        "lmlab_ms_per_step": lmlab_ms,
        "overhead_ms_per_step": lmlab_ms - raw["step_ms"],
        "steps": args.steps,
        "torch": torch.__version__,
    }
    print(json.dumps(result))  # one line, the last


if __name__ == "__main__":
    main()
