"""Latency of serve.py streaming a chat reply: time to first token and decode tokens/s of one stream (median of N).

serve.py runs as a user runs it, in a subprocess (``python serve.py run=<run> port=0 device=<device>
generation=greedy``); this process sends it ``--requests`` streamed chat completions one after another (fixed prompts
in turn, temperature 0, ``max_tokens``) through the official openai client, after one untimed warm-up request. Per
request: time to first token (request sent -> first chunk with text), decode tokens/s ((completion tokens - 1) /
(the chunk with the finish reason - the first text)) and the whole request's seconds; the table reports medians.

Anchor: the same folder through plain transformers in this process (``from_pretrained`` in the server's dtype, the
chat template, ``generate()`` greedy with a streamer that times every token), the same prompts and lengths, after
the server has stopped. The gap is what HTTP, the server and its streaming cost; the replies must be the same text.

    python benchmarks/serve_latency.py --run outputs/sft/llama-tiny/<run>                       # CPU
    python benchmarks/serve_latency.py --run <run> --device cuda --requests 20 --max-tokens 256  # GPU

Writes ``<date>_<device>_serve_latency.{json,md}`` into ``--out`` (default: $OUT if set, else benchmarks/results).
Needs the repo's requirements (fastapi, uvicorn, and openai from the dev extra), not an installed lmlab.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

PROMPTS = [  # the bundled SFT data's kind of questions (data/sample), English and Chinese
    "What is 3 plus 4?",
    "三加四等于多少？",
    "Add the two numbers. 11 + 10",
    "Tell me about the weather today.",
]

from transformers.generation.streamers import BaseStreamer

from lmlab.core.models import resolve_hf_dir
from lmlab.infer.generation import inference_dtype


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """``python serve.py`` on a free port; its URL once it has printed it."""
    command = [
        sys.executable,
        "serve.py",
        f"run={args.run}",
        "port=0",
        f"device={args.device}",
        f"dtype={args.dtype}",
        "generation=greedy",
        f"max_context_tokens={args.max_context_tokens}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with log.open("w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"at (http://\S+/v1)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"serve.py printed no URL in 300 s:\n{log.read_text()[-3000:]}")


def timings(start: float, first: float | None, last: float | None, tokens: int, end: float) -> dict:
    """One reply's numbers from its clock readings (``first``/``last``: its first text and its last token)."""
    decode_s = (last - first) if first is not None and last is not None else 0.0
    return {
        "ttft_ms": 1000 * (first - start) if first is not None else None,
        "decode_tokens_per_s": (tokens - 1) / decode_s if decode_s > 0 else None,
        "completion_tokens": tokens,
        "total_s": end - start,
    }


def stream_once(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed request: its timings and text. Its last token is the one before the chunk with the finish reason
    (an EOS adds no text, but it is a token the model generated, as the anchor's last one is)."""
    start = time.perf_counter()
    first = last = None
    text, tokens = [], 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            last = time.perf_counter()
    return {**timings(start, first, last, tokens, time.perf_counter()), "text": "".join(text)}


def measure_server(args: argparse.Namespace, work: Path) -> dict:
    import openai

    proc, url = start_server(args, work / "serve.log")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        stream_once(client, model, PROMPTS[0], args.max_tokens)  # warm-up: first-call allocations, lazy imports
        runs = [
            {
                "prompt": PROMPTS[i % len(PROMPTS)],
                **stream_once(client, model, PROMPTS[i % len(PROMPTS)], args.max_tokens),
            }
            for i in range(args.requests)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"url": url, "model": model, "runs": runs, "server_log_tail": (work / "serve.log").read_text()[-2000:]}


class TokenClock(BaseStreamer):
    """The time each generated token reaches the host (generate() hands the prompt over first; it is skipped)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def measure_anchor(args: argparse.Namespace) -> dict:
    """Plain transformers on the same folder: chat template, greedy generate() with KV cache, per-token times."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    hf_dir = str(resolve_hf_dir(args.run))
    seq2seq = AutoConfig.from_pretrained(hf_dir).is_encoder_decoder
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=inference_dtype(args.dtype, args.device)).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    settings = {"do_sample": False, "max_new_tokens": args.max_tokens, "eos_token_id": tokenizer.eos_token_id}
    settings["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def once(prompt: str) -> dict:
        start = time.perf_counter()
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if seq2seq else [])
        clock = TokenClock()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=args.device), streamer=clock, **settings)
        reply = out[0, (1 if seq2seq else len(ids)) :].tolist()
        reply = reply[: reply.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in reply else reply
        text = tokenizer.decode(reply, skip_special_tokens=True)
        first, last = (clock.times[0], clock.times[-1]) if clock.times else (None, None)
        return {**timings(start, first, last, len(clock.times), time.perf_counter()), "text": text}

    once(PROMPTS[0])  # warm-up, as the server's
    return {
        "runs": [{"prompt": PROMPTS[i % len(PROMPTS)], **once(PROMPTS[i % len(PROMPTS)])} for i in range(args.requests)]
    }


def trained_with(run: Path) -> str | None:
    """The train.py command that made an lmlab run folder (its saved overrides), so a result says what it served."""
    overrides = run / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    return " ".join(["python train.py", *(f"'{o}'" if " " in o else o for o in OmegaConf.load(overrides))])


def medians(runs: list[dict]) -> dict:
    keys = ("ttft_ms", "decode_tokens_per_s", "completion_tokens", "total_s")
    return {k: statistics.median(v) if (v := [r[k] for r in runs if r[k] is not None]) else None for k in keys}


def markdown(result: dict) -> str:
    def row(name: str, m: dict) -> str:
        decode = f"{m['decode_tokens_per_s']:,.1f}" if m["decode_tokens_per_s"] else "n/a"
        return f"| {name} | {m['ttft_ms']:.1f} | {decode} | {m['total_s']:.3f} | {m['completion_tokens']:.0f} |"

    server, anchor = result["server"]["median"], result["anchor"]["median"]
    v = result["versions"]
    return "\n".join(
        [
            f"# serve.py latency: {result['run']} ({result['date']})",
            "",
            (
                f"{result['device']} (1-minute load average {result['load_average_1min_before']:.2f} before), "
                f"{result['dtype']}, {result['torch_threads']} torch threads; torch {v['torch']}, "
                f"transformers {v['transformers']}, fastapi {v['fastapi']}, uvicorn {v['uvicorn']}, openai "
                f"{v['openai']}. {result['requests']} streamed requests one at a time after one warm-up, greedy, "
                f"max_tokens {result['max_tokens']}, prompts in turn: {', '.join(map(repr, PROMPTS))}. Medians. "
                "Time to first token: request sent -> first text chunk (server) or first generated token on the host "
                "(anchor: plain transformers generate() in-process, same folder and dtype). Decode: (completion "
                "tokens - 1) / (last token - first text), the EOS counted as a token (server: the last token is the "
                "chunk with the finish reason)."
            ),
            "",
            "| side | time to first token, ms | decode tokens/s | request s | completion tokens |",
            "| --- | ---: | ---: | ---: | ---: |",
            row("serve.py (HTTP, SSE, openai client)", server),
            row("transformers generate() (anchor)", anchor),
            "",
            f"Same replies as the anchor: {result['same_text']} of {result['requests']}.",
            "",
            f"The run: `{result['run_trained_with'] or 'not an lmlab run folder'}`.",
            "",
            f"Command: `{result['command']}`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder or HF folder (causal or T5)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (serve.py's device=)")
    parser.add_argument("--dtype", default="auto", help="serve.py's dtype= (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--requests", type=int, default=8, help="timed requests (the medians' N)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-context-tokens", type=int, default=1024)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads, server and anchor alike (1 on a CPU shared with other jobs: a thread that waits "
        "for a busy core stalls every step of the others)",
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]  # on a shared CPU, other jobs' load shows in the numbers
    with tempfile.TemporaryDirectory(prefix="lmlab_serve_bench_") as tmp:
        server = measure_server(args, Path(tmp))
    anchor = measure_anchor(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {
        "run": str(args.run),
        "run_trained_with": trained_with(Path(args.run)),
        "device": device,
        "dtype": str(inference_dtype(args.dtype, args.device)).removeprefix("torch."),
        "date": datetime.date.today().isoformat(),
        "versions": {
            **{p: version(p) for p in ("torch", "transformers", "fastapi", "uvicorn", "openai")},
            "python": sys.version.split()[0],
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": load_before,
        "server": {**server, "median": medians(server["runs"])},
        "anchor": {**anchor, "median": medians(anchor["runs"])},
        "same_text": sum(s["text"] == a["text"] for s, a in zip(server["runs"], anchor["runs"], strict=True)),
    }
    gpu = re.search(r"\b([A-Z]\d{2,4})\b", device)
    stem = f"{result['date']}_{gpu.group(1).lower() if gpu else 'cpu'}_serve_latency"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / stem}.{{json,md}}")


if __name__ == "__main__":
    main()
