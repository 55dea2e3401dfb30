"""Peak GPU memory and time of a DPO policy step's answer log-probs: lmlab's ways against the fp32 cross entropy
of formed logits (the anchor), in one process on the same model, batch and labels.

GPT-2 (124M) at GPT-2's 50257-token vocabulary, bf16 autocast, 2B = 16 rows of 320 tokens (dpo_throughput.py's
shape), the last 172 of each row labelled as an answer. The sides:
- ``plain fp32 cross entropy``: the model's logits, ``F.cross_entropy`` in fp32 (what DPO did first);
- ``label_logps``: the model's logits, lmlab.core.losses.label_logps (chunked, recomputing backward);
- ``head_label_logps``: the base model's hidden states at the label positions through the head
  (lmlab.core.losses.head_label_logps, DPO's ``fused_lm_head``): no logits formed; the head padded as
  conf/train.yaml's ``align_lm_head`` pads a run's.
Each side: the forward, the per-row log-prob sums, their backward; peak memory is ``torch.cuda.max_memory_allocated``
over that, reset before each side; time is the median of ``--repeats`` steps after ``--warmup`` steps (CUDA events).
The embedding gradients of every side are compared with the anchor's. ``--compile`` compiles what DPOModule compiles
(the model, or for the fused head its base model) and the log-probs' element-wise work.

    python benchmarks/dpo_logps_memory.py [--compile]          # GPU, ~30 s (~2 min compiled)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
ALIGN = OmegaConf.load(REPO / "conf" / "train.yaml").align_lm_head  # the fused head's padding, as in a DPO run
sys.path.insert(0, str(REPO))
from gpu_throughput import profile_summary, profiler  # noqa: E402  (this folder, beside this script)

from lmlab.core.collate import IGNORE_INDEX  # noqa: E402
from lmlab.core.losses import head_label_logps, label_logps  # noqa: E402


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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", type=int, default=0, help="then N steps a side under torch.profiler")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    model.cuda().train()
    if args.compile:
        model.compile()
        model.transformer.compile()
    ids = torch.randint(0, 50257, (args.rows, args.seq_len), device="cuda")
    labels = ids.roll(-1, dims=1)
    labels[:, : args.seq_len - args.answer] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    positions = labels.flatten().ne(IGNORE_INDEX).nonzero().squeeze(1)

    def from_logits(logps_of):
        return lambda: logps_of(model(input_ids=ids, use_cache=False).logits, labels)

    def fused(compile: bool):
        def logps() -> torch.Tensor:
            hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
            return head_label_logps(hidden, model.lm_head.weight, labels, positions, compile=compile, multiple=ALIGN)[0]

        return logps

    sides = {
        "plain fp32 cross entropy": from_logits(plain_logps),
        "label_logps": from_logits(lambda logits, labels: label_logps(logits, labels, compile=args.compile)),
        "head_label_logps": fused(args.compile),
    }
    if args.compile:  # the model compiled, the log-probs' element-wise work not
        sides["head_label_logps, chunks eager"] = fused(False)

    def step(logps) -> float:
        model.zero_grad(set_to_none=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = logps()
        out.sum(-1).sum().backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **vars(args),
        "align_lm_head": ALIGN,
        "sides": {},
    }
    grads = {}
    for name, logps_of in sides.items():
        for _ in range(args.warmup):
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
        if args.profile:
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profiler() as prof:
                for _ in range(args.profile):
                    step(logps_of)
            result["sides"][name]["profile"] = profile_summary(prof, args.profile, time.perf_counter() - start, top=15)
    anchor = grads.pop("plain fp32 cross entropy")
    for name, grad in grads.items():
        result["sides"][name]["embedding_grad_max_rel_diff"] = ((grad - anchor).abs().max() / anchor.abs().max()).item()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
