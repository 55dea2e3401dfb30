"""Corpus tokenization throughput (MB/s per core) on Chinese text: lmlab's sharded prepare_data vs raw encode_batch.

    python benchmarks/tokenize_throughput.py                  # ~50 MB corpus, a few minutes on 2 cores
    python benchmarks/tokenize_throughput.py --mb 5 --long-line-mb 5 --repeats 1   # quick check of the script

The corpus is the shared Chinese corpora (zh_wiki_sampled, zh_cluecorpus_sampled, zh_classic_novels; one document
per line) repeated to ``--mb`` in a temp dir; the tokenizer is a byte-level BPE (vocab 6400) trained on their first
few MB with lmlab.core.tokenizer.train_bpe. Threads are pinned so "per core" is honest: the raw anchor runs
single-threaded (TOKENIZERS_PARALLELISM=false) and, for reference, with the tokenizers thread pool on every core;
lmlab's workers are single-threaded processes (num_proc of them) plus the reading process. lmlab's time is end to
end: reading and splitting the file, starting the workers, tokenizing, writing shards and meta.json. Every side runs
``--repeats`` times and keeps its best. On a shared, busy box wall-clock MB/s per core understates what a core
does, so CPU time (the process's threads plus its finished workers) is measured too: MB per CPU-second; the load
average is recorded. The
50 MB single-line case runs in a fresh process (so its peak memory is its own): one document read whole and
tokenized in pieces of data.chunk_chars, with its time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))
SHARED = REPO.parent / "shared" / "data"
SOURCES = [
    "zh_wiki_sampled/zhwiki_sampled.txt",
    "zh_cluecorpus_sampled/CLUECorpusSmall_sampled.txt",
    *(f"zh_classic_novels/{name}.txt" for name in ("hongloumeng", "xiyouji", "sanguo_yanyi", "shuihu_zhuan")),
]
BATCH = 1000  # documents per raw encode_batch call


def chinese_docs() -> list[str]:
    return [line for src in SOURCES for line in (SHARED / src).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_corpus(docs: list[str], path: Path, mb: float) -> int:
    """The documents, repeated until the file holds ``mb`` MB; returns its size in bytes."""
    block = "\n".join(docs) + "\n"
    repeats = max(1, round(mb * 1e6 / len(block.encode("utf-8"))))
    path.write_text(block * repeats, encoding="utf-8")
    return path.stat().st_size


def train_tokenizer(docs: list[str], out: Path, train_mb: float):
    from hydra import compose, initialize_config_dir

    from lmlab.core.tokenizer import train_bpe

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        bpe = compose("train", overrides=["bpe.vocab_size=6400"]).bpe
    texts, size = [], 0
    for doc in docs:
        if size >= train_mb * 1e6:
            break
        texts.append(doc)
        size += len(doc.encode("utf-8"))
    tokenizer = train_bpe(texts, **bpe)
    tokenizer.save_pretrained(out)
    return tokenizer


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished child processes (pool workers)."""
    return sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )


def best_time(fn: Callable[[], int], repeats: int) -> tuple[float, float, int]:
    """(fastest wall seconds, its CPU seconds, the token count fn returns) over ``repeats`` runs."""
    runs = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), cpu_seconds()
        tokens = fn()
        runs.append((time.perf_counter() - start, cpu_seconds() - cpu_start, tokens))
    return min(runs)


def raw_encode(tokenizer_dir: Path, corpus: Path, threads: str, method: str) -> Callable[[], int]:
    """The anchor: read the corpus and run the raw ``tokenizers`` object over it in batches of BATCH documents."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    encode = getattr(backend, method)

    def run() -> int:
        os.environ["TOKENIZERS_PARALLELISM"] = threads
        docs = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
        tokens = 0
        for i in range(0, len(docs), BATCH):
            tokens += sum(len(e.ids) + 1 for e in encode(docs[i : i + BATCH], add_special_tokens=False))
        return tokens

    return run


def lmlab_prepare(tokenizer, corpus: Path, cache: Path, num_proc: int, engine: str) -> Callable[[], int]:
    """PretrainDataModule.prepare_data as configured in conf/data/sample_text.yaml, on the corpus, from scratch, with
    ``data.tokenize_engine=engine``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [
        f"data.train_files=[{corpus}]",
        f"paths.cache_dir={cache}",
        f"data.num_proc={num_proc}",
        f"data.tokenize_engine={engine}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        data_cfg = compose("train", overrides=overrides).data
    instantiate(data_cfg)  # imports (torch, lightning) not timed

    def run() -> int:  # a new datamodule each run: one keeps its first read of the files (the plan) for later calls
        shutil.rmtree(cache, ignore_errors=True)
        dm = instantiate(data_cfg)
        dm.tokenizer = tokenizer
        dm.prepare_data()
        meta = json.loads((dm.token_dir / "meta.json").read_text())
        return sum(meta["tokens"].values())

    return run


def rss_mb(field: str) -> int:
    """This process's resident memory (VmRSS) or its peak (VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    return round(int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1e3)


def _long_line_in_fresh_process(tokenizer_dir: Path, long_file: Path, cache: Path, queue) -> None:
    """prepare_data in this process (num_proc=0, one thread, the default engine), reporting its time and memory."""
    from transformers import AutoTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    run = lmlab_prepare(AutoTokenizer.from_pretrained(tokenizer_dir), long_file, cache, 0, "auto")
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    run()
    queue.put(
        {"seconds": round(time.perf_counter() - start, 2), "rss_before_MB": before, "peak_rss_MB": rss_mb("VmHWM")}
    )


def measure_long_line(docs: list[str], tmp: Path, mb: float) -> dict:
    """The 50 MB single-line case in a fresh process, so its peak memory is its own."""
    block = " ".join(docs).encode("utf-8")
    long_file = tmp / "long.txt"
    long_file.write_bytes(
        (block * (int(mb * 1e6) // len(block) + 1))[: int(mb * 1e6)].decode("utf-8", "ignore").encode("utf-8") + b"\n"
    )
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_long_line_in_fresh_process, args=(tmp / "tokenizer", long_file, tmp / "long_cache", queue)
    )
    process.start()
    result = queue.get()
    process.join()
    chunk_chars = json.loads(next((tmp / "long_cache").rglob("meta.json")).read_text())["chunk_chars"]
    size = long_file.stat().st_size / 1e6
    return {"MB": round(size, 1), "MB/s": round(size / result["seconds"], 2), "chunk_chars": chunk_chars, **result}


def row(side: str, cores: int, threads: str, seconds: float, cpu: float, tokens: int, text_bytes: int) -> dict:
    """Wall-clock MB/s, per core used, and per CPU-second (what a core really did, robust to a busy machine)."""
    mb = text_bytes / 1e6
    return {
        "side": side,
        "cores": cores,
        "threads": threads,
        "seconds": round(seconds, 2),
        "cpu seconds": round(cpu, 2),
        "tokens": tokens,
        "MB/s": round(mb / seconds, 2),
        "MB/s per core": round(mb / seconds / cores, 2),
        "MB per CPU-second": round(mb / cpu, 2),
    }


def markdown(result: dict) -> str:
    cols = [
        "side",
        "cores",
        "threads",
        "seconds",
        "cpu seconds",
        "tokens",
        "MB/s",
        "MB/s per core",
        "MB per CPU-second",
    ]
    lines = [
        f"# Corpus tokenization throughput on Chinese text ({result['date']})",
        "",
        result["setup"],
        "",
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * 6) + " |",
    ]
    lines += [
        "| " + " | ".join(f"{r[c]:,}" if c == "tokens" else str(r[c]) for c in cols) + " |" for r in result["rows"]
    ]
    long = result["long_line"]
    lines += [
        "",
        (
            f"Single long line: {long['MB']} MB in one document, {long['seconds']} s ({long['MB/s']} MB/s, "
            f"num_proc=0 on one thread, chunk_chars={long['chunk_chars']}); the process's peak RSS "
            f"{long['peak_rss_MB']} MB, {long['rss_before_MB']} MB before prepare_data."
        ),
        "",
        f"Load average (1 min) before / after: {result['loadavg_before']} / {result['loadavg_after']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size")
    parser.add_argument("--train-mb", type=float, default=4, help="text the tokenizer is trained on")
    parser.add_argument("--long-line-mb", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()

    import tokenizers

    loadavg_before = round(os.getloadavg()[0], 2)
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = chinese_docs()
        tokenizer = train_tokenizer(docs, tmp / "tokenizer", args.train_mb)
        corpus = tmp / "corpus.txt"
        write_corpus(docs, corpus, args.mb)
        text_bytes = sum(
            len(line.encode("utf-8")) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()
        )  # what every side tokenizes: documents without newlines
        sides = [
            (
                "raw encode_batch",
                1,
                "1 (TOKENIZERS_PARALLELISM=false)",
                raw_encode(tmp / "tokenizer", corpus, "false", "encode_batch"),
            ),
            (
                "raw encode_batch",
                cores,
                f"{cores} (tokenizers thread pool)",
                raw_encode(tmp / "tokenizer", corpus, "true", "encode_batch"),
            ),
            (
                "raw encode_batch_fast",
                1,
                "1 (TOKENIZERS_PARALLELISM=false)",
                raw_encode(tmp / "tokenizer", corpus, "false", "encode_batch_fast"),
            ),
            *(
                (
                    f"lmlab prepare_data {engine} num_proc={n}",
                    n,
                    f"{n} worker(s) x 1 + reader",
                    lmlab_prepare(tokenizer, corpus, tmp / "cache", n, engine),
                )
                for engine in ("tokenizers", "tiktoken")
                for n in range(1, cores + 1)
            ),
        ]
        long_line = measure_long_line(docs, tmp, args.long_line_mb)
        print(json.dumps(long_line), flush=True)

        rows = []
        for side, n_cores, threads, fn in sides:
            seconds, cpu, tokens = best_time(fn, args.repeats)
            rows.append(row(side, n_cores, threads, seconds, cpu, tokens, text_bytes))
            print(json.dumps(rows[-1]), flush=True)

    result = {
        "date": date.today().isoformat(),
        "setup": (
            f"{platform.processor() or platform.machine()}, {cores} cores; Python {platform.python_version()}, "
            f"tokenizers {tokenizers.__version__}; corpus {text_bytes / 1e6:.1f} MB of document text "
            f"({', '.join(SOURCES)} repeated), byte-level BPE vocab 6400 trained on {args.train_mb} MB; "
            f"best of {args.repeats}; lmlab with conf/data/sample_text.yaml's shard_mb and chunk_chars."
        ),
        "rows": rows,
        "long_line": long_line,
        "loadavg_before": loadavg_before,
        "loadavg_after": round(os.getloadavg()[0], 2),
    }
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
