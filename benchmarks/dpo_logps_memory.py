"""Peak GPU memory and time of a DPO policy step's answer log-probs: lmlab.core.losses.label_logps against the fp32
cross entropy it replaced (the anchor), in one process on the same model, batch and labels.

GPT-2 (124M) at GPT-2's 50257-token vocabulary, bf16 autocast, 2B = 16 rows of 320 tokens (dpo_throughput.py's
shape), the last 172 of each row labelled as an answer. Each side: the forward, the per-row log-prob sums, their
backward; peak memory is ``torch.cuda.max_memory_allocated`` over that, reset before each side; time is the median
of ``--repeats`` steps after two warmup steps (CUDA events). The gradients of both sides are compared.

    python benchmarks/dpo_logps_memory.py          # GPU, ~30 s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmlab.core.collate import IGNORE_INDEX  # noqa: E402
from lmlab.core.losses import label_logps  # noqa: E402


def plain_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What lightning_modules/dpo_loss.sequence_logps computed before label_logps."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=320)
    parser.add_argument("--answer", type=int, default=172)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    model.cuda().train()
    ids = torch.randint(0, 50257, (args.rows, args.seq_len), device="cuda")
    labels = ids.roll(-1, dims=1)
    labels[:, : args.seq_len - args.answer] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX

    def step(logps_of) -> float:
        model.zero_grad(set_to_none=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        logps_of(logits, labels).sum(-1).sum().backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args), "sides": {}}
    grads = {}
    for name, logps_of in (("plain fp32 cross entropy", plain_logps), ("label_logps", label_logps)):
        for _ in range(2):
            step(logps_of)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = [step(logps_of) for _ in range(args.repeats)]
        result["sides"][name] = {
            "peak_gib_above_weights_and_grads": (torch.cuda.max_memory_allocated() - before) / 2**30,
            "step_ms_median": statistics.median(times),
        }
        grads[name] = model.transformer.wte.weight.grad.float().clone()
    a, b = grads.values()
    result["embedding_grad_max_rel_diff"] = ((a - b).abs().max() / a.abs().max()).item()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
