"""Does cuDNN attention's backward return NaN gradients on this GPU? (the cause of T5's bf16 NaN)

pytorch/pytorch#196678: on H100/H200 with torch 2.11-2.13, the cuDNN backend of scaled_dot_product_attention returns
NaN query gradients for a masked attention over a length with ``length % 128 == 64`` when every logit of a row is
below about -88 (its logsumexp underflows in fp32). T5 always passes its relative position bias as the mask, and
lmlab pads batches to multiples of 64 on GPU, so T5's decoder (max_target_length 64) meets the length.

    python benchmarks/sdpa_cudnn_probe.py [--out results.json]

The bug itself, torch only: non-finite grad_q over lengths, cuDNN allowed vs forbidden. What it does to lmlab's T5
is measured by training (benchmarks/results/2026-11-30_h200_t5_bf16_cudnn.md): SFT of a span-corruption-pretrained
t5 on LCSTS in bf16 goes NaN at step 18 with cuDNN attention allowed and trains with it forbidden.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmlab.core.models import sdpa_settings


def torch_only(length: int, cudnn: bool | str) -> tuple[int, bool]:
    """(non-finite grad_q elements, whether a cuDNN kernel ran) of one masked SDPA whose logits are all about -120
    (the issue's repro), through transformers' ``sdpa`` attention as lmlab's ``cudnn_sdpa`` setting leaves it (true,
    false or safe). tests/test_gpu.py runs it too."""
    torch.manual_seed(0)
    d = 64
    q = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16) * 0.1
    k = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16) * 0.1
    v = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(d)
    q.requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    with sdpa_settings(cudnn, varlen=False), profile(activities=[ProfilerActivity.CUDA]) as prof:
        out, _ = AttentionInterface()["sdpa"](torch.nn.Module(), q, k, v, mask)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
    used_cudnn = any("cudnn" in e.key.lower() for e in prof.key_averages())
    return int((~torch.isfinite(q.grad)).sum()), used_cudnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "torch_only": {},  # non-finite grad_q elements
        "cudnn_kernel_ran": {},
    }
    for length in (640, 704, 768):
        for c in (True, False, "safe"):
            nonfinite, used_cudnn = torch_only(length, c)
            results["torch_only"].setdefault(length, {})[f"cudnn_{c}"] = nonfinite
            results["cudnn_kernel_ran"].setdefault(length, {})[f"cudnn_{c}"] = used_cudnn
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
