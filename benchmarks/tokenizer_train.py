"""Tokenizer training at scale on a CPU: time and peak RSS of lmlab's BPE trainer vs. the naive tokenizers way.

    python benchmarks/tokenizer_train.py            # ~100 MB of Chinese text, ~15 min on 2 cores
    python benchmarks/tokenizer_train.py --smoke    # 2 MB, a check of the script itself

The corpus mixes the shared Chinese corpora (wiki, CLUECorpus, four classic novels, LCSTS news; ~16 MB) and
repeats them until it reaches the target size. A verbatim repeat adds no new unique pieces, which is what the
trainer's memory grows with, so repeats are perturbed: every clause is cut at a random point and glued to the tail
of another clause of the same document. That keeps the text's character and word statistics (only one seam per
clause is new) while making nearly every piece new, as real unseen text would: the worst case for memory.

Each configuration runs in a fresh subprocess that reports its own peak RSS (ru_maxrss). The anchor is plain
``tokenizers.ByteLevelBPETokenizer`` trained the naive way: whole lines in, its default ByteLevel pre-tokenizer.
Writes benchmarks/results/<date>_cpu_tokenizer_train.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
SOURCES = [
    DATA / "zh_wiki_sampled" / "zhwiki_sampled.txt",
    DATA / "zh_cluecorpus_sampled" / "CLUECorpusSmall_sampled.txt",
    *sorted((DATA / "zh_classic_novels").glob("*.txt")),
    DATA / "zh_summarization_lcsts" / "train.tsv",
]
CLAUSE = re.compile(r"[^，。！？；：、,.!?;:]+[，。！？；：、,.!?;:]*")
MB = 10**6


def source_docs() -> list[str]:
    """One document per non-empty line of the shared Chinese corpora (LCSTS: summary and text joined)."""
    docs = []
    for path in SOURCES:
        docs += [line.replace("\t", " ").strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [d for d in docs if d]


def splice(doc: str, rng: random.Random) -> str:
    """The document with each clause's head glued to the tail of another of its clauses."""
    clauses = CLAUSE.findall(doc)
    if len(clauses) < 2:
        return doc
    others = clauses[:]
    rng.shuffle(others)
    return "".join(
        a[: rng.randint(1, max(1, len(a) - 1))] + b[rng.randint(1, max(1, len(b) - 1)) :]
        for a, b in zip(clauses, others, strict=True)
    )


def build_corpus(path: Path, target_bytes: int) -> int:
    """Write a corpus of about target_bytes, one document a line: the sources once, then spliced repeats."""
    rng, docs, size, repeat = random.Random(0), source_docs(), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_bytes:
            for doc in docs:
                line = (doc if repeat == 0 else splice(doc, rng)) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= target_bytes:
                    break
            repeat += 1
    return size


def lines(path: str, passes: int) -> Iterator[str]:
    """The corpus streamed line by line, ``passes`` times over (a larger corpus without a larger file)."""
    for _ in range(passes):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def worker(job: dict) -> dict:
    """Train one configuration in this (fresh) process and report its time and peak RSS."""
    if job["impl"] == "naive":
        from tokenizers import ByteLevelBPETokenizer

        start = time.perf_counter()
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(
            lines(job["file"], job["passes"]),
            vocab_size=job["vocab"],
            min_frequency=2,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        return {
            "vocab_size": tok.get_vocab_size(),
            "train_seconds": round(seconds, 1),
            "train_bytes": job["passes"] * os.path.getsize(job["file"]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lmlab.core.tokenizer import train_bpe_with_report

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        bpe = OmegaConf.to_container(compose("train", overrides=[f"bpe={job['level']}"]).bpe, resolve=True)
    bpe.update(vocab_size=job["vocab"], max_bytes=job["max_bytes"])
    _, report = train_bpe_with_report(
        lines(job["file"], job["passes"]), total_bytes=job["passes"] * os.path.getsize(job["file"]), **bpe
    )
    return report


def run_job(job: dict) -> dict:
    """One configuration in a fresh subprocess, so each peak RSS is its own."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    result = {
        **job,
        **json.loads(proc.stdout.strip().splitlines()[-1]),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    rows = [
        "| name | corpus MB | trained MB | vocab | train s | peak RSS MB | RSS / naive | chars/token | unk share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        anchor = next((a for a in results if a["impl"] == "naive" and a["corpus_mb"] == r["corpus_mb"]), None)
        ratio = f"{r['peak_rss_mb'] / anchor['peak_rss_mb']:.2f}" if anchor else "-"
        cpt, unk = r.get("chars_per_token"), r.get("unk_share")
        rows.append(
            f"| {r['name']} | {r['corpus_mb']:.0f} | {r['train_bytes'] / MB:.1f} | {r['vocab_size']} | "
            f"{r['train_seconds']} | {r['peak_rss_mb']:.0f} | {ratio} | {cpt if cpt else '-'} | "
            f"{'-' if unk is None else f'{unk:.4f}'} |"
        )
    head = (
        f"# Tokenizer training, {meta['date']}, {meta['device']}\n\n"
        f"Corpus: {meta['corpus']}\n\nTotal benchmark time: {meta['total_seconds']} s.\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size-mb", type=int, default=100, help="corpus size (the small size is a quarter of it)")
    parser.add_argument("--smoke", action="store_true", help="2 MB corpus, results not written")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    size = 2 * MB if args.smoke else args.size_mb * MB
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.txt", Path(tmp) / "small.txt"
        build_corpus(big, size)
        with open(big, "rb") as src, open(small, "wb") as dst:  # the first quarter of the same text, whole lines
            dst.write(src.read(size // 4).rsplit(b"\n", 1)[0] + b"\n")
        budget = size // 4
        passes = 16  # the 1.6 GB stream: 16 passes over the big file, sampled down to the budget
        jobs = [
            ("naive byte 6400", "naive", "byte", 6400, small, 1, None),
            ("lmlab byte 6400", "lmlab", "byte", 6400, small, 1, None),
            ("naive byte 6400", "naive", "byte", 6400, big, 1, None),
            ("lmlab byte 6400, max_bytes=1/4", "lmlab", "byte", 6400, big, 1, budget),
            ("lmlab byte 32000, max_bytes=1/4", "lmlab", "byte", 32000, big, 1, budget),
            ("lmlab byte 6400, 16 passes, max_bytes=25 MB", "lmlab", "byte", 6400, big, passes, budget),
            ("lmlab char 6400", "lmlab", "char", 6400, small, 1, None),
            ("lmlab char 6400", "lmlab", "char", 6400, big, 1, None),
            ("lmlab char 32000", "lmlab", "char", 32000, big, 1, None),
        ]
        results = []
        for name, impl, level, vocab, path, n, max_bytes in jobs:
            job = {
                "name": name,
                "impl": impl,
                "level": level,
                "vocab": vocab,
                "file": str(path),
                "passes": n,
                "max_bytes": max_bytes,
                "corpus_mb": n * path.stat().st_size / MB,
            }
            results.append(run_job(job))
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": f"CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "corpus": f"{size / MB:.0f} MB of Chinese (shared corpora, ~16 MB, then clause-spliced repeats); the small "
        f"corpus is its first quarter; the {passes}-pass row streams the big file {passes} times",
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    for r in results:
        r.pop("file")
    print(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    print(table)
    if not args.smoke:
        out = REPO / "benchmarks" / "results" / f"{meta['date']}_cpu_tokenizer_train"
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
