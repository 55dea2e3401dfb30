"""Causal attention's forward and backward time at lmlab's pretraining shapes, per attention kernel on this GPU.

Why: on the H200 a compiled GPT-2 124M step (16 x 1024) spends about a quarter of its GPU time in attention
(benchmarks/results/2026-12-02_h200_gpt2_step.md), and the raw loop and lmlab both run SDPA's cuDNN kernel there.
This tells whether another kernel torch offers here would be faster: SDPA's cuDNN, flash (FlashAttention-2) and
memory-efficient backends, and FlexAttention compiled with a causal block mask (its default tiles and 128 x 64).

Each shape is a preset's attention at its training batch: (batch, heads, length, head dim), bf16, ``is_causal``.
Each kernel runs ``--warmup`` untimed forward+backward passes, then ``--iters`` timed ones; the median forward and
backward ms (CUDA events) and TFLOP/s counting causal work only (forward 2 x 2 x B x H x T^2 x D / 2, backward 2.5x
the forward). A kernel that cannot run a shape here is recorded with its error.

    python benchmarks/attention_backends.py            # GPU; JSON + markdown into $OUT, else the current folder
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

SHAPES = {  # preset: (batch, heads, length, head dim) at the batch the README's throughput table uses
    "gpt2 16x1024": (16, 12, 1024, 64),
    "llama (246M) 32x512": (32, 12, 512, 128),
}
SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
FLEX_TILES = {"flex": {}, "flex 128x64": {"kernel_options": {"BLOCK_M": 128, "BLOCK_N": 64}}}

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(backend: str) -> Attention:
    """Causal SDPA restricted to one backend."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def flex(length: int, options: dict) -> Attention:
    """Compiled FlexAttention with a causal block mask (FlexAttention is only fast compiled)."""
    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, length, length, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask, **options)


def time_ms(attention: Attention, shape: tuple[int, int, int, int], warmup: int, iters: int) -> tuple[float, float]:
    """Median forward and backward ms of ``attention`` on random bf16 inputs of ``shape``."""
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    forward, backward = [], []
    for i in range(warmup + iters):
        start.record()
        out = attention(q, k, v)
        end.record()
        torch.cuda.synchronize()
        fwd = start.elapsed_time(end)
        start.record()
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            forward.append(fwd)
            backward.append(start.elapsed_time(end))
    return statistics.median(forward), statistics.median(backward)


def measure(warmup: int, iters: int) -> dict:
    """Every kernel at every shape: ms and TFLOP/s, or the error that kept it from running."""
    results = {}
    for name, shape in SHAPES.items():
        batch, heads, length, dim = shape
        flops = 2 * 2 * batch * heads * length * length * dim / 2  # causal forward: QK^T and PV over half the scores
        kernels = {f"sdpa {b.split('_')[0].lower()}": sdpa(b) for b in SDPA_BACKENDS}
        kernels |= {tiles: flex(length, options) for tiles, options in FLEX_TILES.items()}
        rows = {}
        for kernel, attention in kernels.items():
            try:
                fwd, bwd = time_ms(attention, shape, warmup, iters)
            except Exception as error:  # noqa: BLE001 - a kernel that cannot run here is a result, not a failure
                rows[kernel] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                continue
            rows[kernel] = {
                "forward_ms": round(fwd, 4),
                "backward_ms": round(bwd, 4),
                "forward_tflops": round(flops / fwd / 1e9, 1),
                "backward_tflops": round(2.5 * flops / bwd / 1e9, 1),
            }
        results[name] = {"shape": list(shape), "kernels": rows}
    return results


def markdown(record: dict) -> str:
    lines = [
        f"# Causal attention kernels at lmlab's pretraining shapes ({record['date']})",
        "",
        f"{record['device']}; torch {record['torch']}, cuDNN {record['cudnn']}; bf16, is_causal; median of "
        f"{record['iters']} passes after {record['warmup']}. TFLOP/s count causal work only.",
        "",
        "| shape (B, H, T, D) | kernel | forward ms | backward ms | forward TFLOP/s | backward TFLOP/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in record["shapes"].items():
        for kernel, row in result["kernels"].items():
            label = f"{name} {tuple(result['shape'])}"
            if "error" in row:
                lines.append(f"| {label} | {kernel} | {row['error']} | | | |")
                continue
            lines.append(
                f"| {label} | {kernel} | {row['forward_ms']:.3f} | {row['backward_ms']:.3f} | "
                f"{row['forward_tflops']} | {row['backward_tflops']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_backends.py times GPU kernels: no CUDA device here")
    record = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "warmup": args.warmup,
        "iters": args.iters,
        "shapes": measure(args.warmup, args.iters),
    }
    text = markdown(record)
    print(text)
    out = Path(os.environ.get("OUT") or ".")
    stem = f"{record['date']}_{record['device'].split()[-1].lower()}_attention_backends"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
