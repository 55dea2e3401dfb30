"""Inference memory of a chat with lmlab's `llama` preset (~0.2B) in fp16: does it fit in 512 MiB for 512 tokens?

The target (issue 8) comes from the seeds: Matelike reports ~396 MB and ChatLM 512 MB for chatting with their
0.2B models. The model is built from conf/model/<preset>.yaml at vocab 6400 (a synthetic word-level tokenizer
of exactly that many entries; random weights, which weigh the same as trained ones), exported with export_hf, then
loaded and run exactly as chat.py does: ``lmlab.infer.generation.load_for_inference`` in ``--dtype``, then one
``lmlab.infer.conversation.ChatSession.reply`` (generate() with its KV cache and a streamer) whose prompt plus
reply fill ``--context`` tokens (the reply is forced to ``--new-tokens`` tokens with ``min_new_tokens``; greedy).

Reported: parameters and their bytes, memory allocated after loading, and over load + generation the peak
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (on a CPU, the process's peak RSS instead),
plus the generation time. Prints JSON and a markdown table and writes both as
``<date>_<device>_<preset>_inference_memory.{json,md}`` into ``$OUT`` if set, else the current folder.

    python benchmarks/inference_memory.py             # GPU: llama, fp16, 448 prompt + 64 new tokens
    python benchmarks/inference_memory.py --smoke     # CPU check: llama-tiny, fp32
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

SPECIALS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "unk": "<|unk|>"}
TARGET_MIB = 512


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` entries ("w0", "w1", ... and the specials), one token per
    word, with the plain chat template (the prompt is the user's text as it is)."""
    from hydra import compose, initialize_config_dir
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate([*words, *SPECIALS.values()])}, unk_token=SPECIALS["unk"])
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS["eos"],
        eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"],
    )
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        fast.chat_template = compose("train", overrides=["template=plain"]).template.chat_template
    assert len(fast) == vocab_size, len(fast)
    return fast


def export_preset(preset: str, vocab_size: int, dtype: torch.dtype, folder: Path) -> None:
    """The preset's model at ``vocab_size``, random weights, saved in ``dtype`` with its tokenizer (an hf/ folder)."""
    from hydra import compose, initialize_config_dir

    from lmlab.core.models import build_model, export_hf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        model_cfg = compose("train", overrides=[f"model={preset}"]).model
    tokenizer = word_tokenizer(vocab_size)
    torch.manual_seed(0)
    export_hf(build_model(model_cfg, tokenizer).to(dtype), tokenizer, folder)


def measure(args: argparse.Namespace, folder: Path) -> dict:
    """Load and chat once as chat.py does; memory and time."""
    import resource

    from lmlab.infer.conversation import ChatSession, ReplyStreamer
    from lmlab.infer.generation import load_for_inference

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_for_inference(folder, args.device, args.dtype)
    after_load = torch.cuda.memory_allocated() if cuda else None
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    session = ChatSession(model, tokenizer, settings, max_context_tokens=args.context)
    prompt_tokens = args.context - args.new_tokens
    prompt = " ".join(f"w{(7 * i) % (args.vocab_size - len(SPECIALS))}" for i in range(prompt_tokens))
    rendered = len(tokenizer.encode(session.render(prompt), add_special_tokens=False))
    assert rendered == prompt_tokens, f"the prompt is {rendered} tokens, expected {prompt_tokens}"
    start = time.perf_counter()
    reply = session.reply(prompt, ReplyStreamer(tokenizer, io.StringIO(), one_line=True))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    mib = 2**20
    return {
        "parameters": params,
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        "after_load_allocated_mib": after_load / mib if cuda else None,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / mib if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / mib if cuda else None,
        "peak_rss_mib": None if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(tokenizer.encode(reply, add_special_tokens=False)),
        "generate_s": seconds,
        "new_tokens_per_s": args.new_tokens / seconds,
    }


def measure_plain(args: argparse.Namespace, folder: Path) -> dict:
    """The anchor, in the same process: plain transformers (from_pretrained in the dtype, one generate() over the
    same number of prompt tokens), no lmlab code; the ratio to it shows what lmlab's chat path adds."""
    import resource

    from transformers import AutoModelForCausalLM

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from lmlab.infer.generation import DTYPES

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[args.dtype]).to(args.device).eval()
    prompt_tokens = args.context - args.new_tokens
    input_ids = torch.tensor(
        [[(7 * i) % (args.vocab_size - len(SPECIALS)) for i in range(prompt_tokens)]], device=args.device
    )
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mib = 2**20
    result = {
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / mib if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / mib if cuda else None,
        "peak_rss_mib": None if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "generate_s": seconds,
    }
    del model
    return result


def markdown(result: dict) -> str:
    m = result["memory"]

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    peak = m["peak_allocated_mib"]
    verdict = (
        "n/a (CPU)" if peak is None else f"{'yes' if peak <= TARGET_MIB else 'no'} (peak allocated {peak:.1f} MiB)"
    )
    return "\n".join(
        [
            f"# {result['preset']} chat inference memory ({result['date']})",
            "",
            (
                f"{result['device']}; {result['dtype']}; vocab {result['vocab_size']}; {m['parameters'] / 1e6:.1f}M "
                f"parameters; context {result['context']} tokens = {m['prompt_tokens']} prompt + "
                f"{result['new_tokens']} "
                f"generated (greedy, KV cache, the chat.py path); torch {result['versions']['torch']}, "
                f"transformers {result['versions']['transformers']}; "
                f"CUBLAS_WORKSPACE_CONFIG={result['cublas_workspace_config'] or 'unset (32 MiB workspace on Hopper)'}."
            ),
            "",
            (
                "| weights MiB | allocated after load MiB | peak allocated MiB | peak reserved MiB | peak RSS MiB "
                "| generate s | new tokens/s |"
            ),
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            (
                f"| {mib(m['weights_mib'])} | {mib(m['after_load_allocated_mib'])} | {mib(peak)} | "
                f"{mib(m['peak_reserved_mib'])} | {mib(m['peak_rss_mib'])} | {m['generate_s']:.2f} | "
                f"{m['new_tokens_per_s']:.1f} |"
            ),
            "",
            f"Fits the {TARGET_MIB} MiB target (Matelike ~396 MB, ChatLM 512 MB): {verdict}.",
            "",
            (
                "Anchor, same process: plain transformers from_pretrained + generate() on the same folder and prompt "
                f"length: peak allocated {mib(result['anchor']['peak_allocated_mib'])} MiB, peak reserved "
                f"{mib(result['anchor']['peak_reserved_mib'])} MiB, generate {result['anchor']['generate_s']:.2f} s; "
                f"lmlab / plain peak allocated: {result['ratio_peak_allocated'] or 'n/a'}."
            ),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama", help="conf/model preset")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--context", type=int, default=512, help="prompt + generated tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float16 (default on GPU) | bfloat16 | float32 (default on CPU)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: llama-tiny, fp32")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.preset = "llama-tiny"
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")

    import transformers

    from lmlab.infer.generation import DTYPES

    with tempfile.TemporaryDirectory(prefix="lmlab_infmem_") as tmp:
        export_preset(args.preset, args.vocab_size, DTYPES[args.dtype], Path(tmp))
        memory = measure(args, Path(tmp))
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        anchor = measure_plain(args, Path(tmp))  # after lmlab's: both runs see cuBLAS's workspace already there
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {
        "preset": args.preset,
        "device": device,
        "dtype": args.dtype,
        "vocab_size": args.vocab_size,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "target_mib": TARGET_MIB,
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "memory": memory,
        "anchor": anchor,
        "ratio_peak_allocated": (
            round(memory["peak_allocated_mib"] / anchor["peak_allocated_mib"], 3)
            if memory["peak_allocated_mib"]
            else None
        ),
    }
    gpu = re.search(r"\b([A-Z]\d{2,4})\b", device)
    workspace = "_cublas_small" if result["cublas_workspace_config"] else ""
    stem = f"{result['date']}_{gpu.group(1).lower() if gpu else 'cpu'}_{args.preset}_inference_memory{workspace}"
    out = Path(os.environ.get("OUT") or ".")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
