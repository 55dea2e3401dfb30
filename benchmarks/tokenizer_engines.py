"""BPE encoding speed on one core: Hugging Face tokenizers against tiktoken, with the same merges (CPU).

Issue 3's target is 5 MB/s of Chinese text per core. This measures what lmlab's byte-level pre-tokenizer and another
engine give, on the corpus of ``tokenize_throughput.py`` (the shared Chinese corpora, each document once), every side
pinned to one core and one thread, best of ``--repeats``, with one tokenizer's merges:

- ``hf_sequence``: tokenizers with the pre-tokenizer lmlab trained before 2026-12-01 (``SEQUENCE_BEFORE``: a
  sequence of punctuation, digits, runs cut at 16 characters, GPT-2's regex). The anchor.
- ``hf``: tokenizers with the tokenizer's own pre-tokenizer, one regex
  (lmlab.core.tokenizer.byte_pieces_regex), then ByteLevel without its own regex.
- ``tiktoken``: tiktoken's ``encode_ordinary`` with that regex and the merges as ranks (a merge's rank is its order;
  single bytes first).

Identical token sequences are counted document by document: ``tiktoken`` against ``hf`` (is the other engine exact?)
and ``hf`` against ``hf_sequence`` (how much the one regex changed the tokens), with tokens per MB for each.

The merges alone (``--fuzz N``): the two engines pick merges differently (tokenizers the adjacent pair of lowest merge
rank, tiktoken the adjacent pair whose joined bytes have the lowest token rank, and a whole piece at once when it is a
token), so both encode single pieces made of random vocabulary tokens: N pieces of 2-5 tokens, and 2 x 2000 around
each token that also splits into two other tokens than its merge pair (the token, and that other pair, between two
random tokens), where a difference would show first. Writes ``<date>_cpu_tokenizer_engines.{json,md}`` into
``$OUT`` (else the current folder).

    pip install tiktoken && python benchmarks/tokenizer_engines.py [--tokenizer <folder>] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: before tokenizers is imported
os.environ["RAYON_NUM_THREADS"] = "1"


def sequence_before():
    """The byte-level pre-tokenizer lmlab trained before the one regex (conf/bpe/byte.yaml's settings)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\s*\S{1,16}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def byte_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in characters back to their bytes (GPT-2's table, as transformers keeps it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """A tokenizer.json's merges as pairs (written "a b" or ["a", "b"])."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]


def bpe_ranks(spec: dict) -> tuple[dict[bytes, int], dict[int, bytes]]:
    """tiktoken's ranks from a byte-level BPE's tokenizer.json (single bytes, then each merge's result in merge
    order), and each HF token id's bytes (added tokens left out)."""
    decode = byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(decode[c] for c in token)

    vocab = spec["model"]["vocab"]
    ranks: dict[bytes, int] = {}
    for token in sorted(vocab, key=vocab.get):
        if len(to_bytes(token)) == 1:
            ranks[to_bytes(token)] = len(ranks)
    for left, right in merge_pairs(spec):
        ranks.setdefault(to_bytes(left) + to_bytes(right), len(ranks))
    id_bytes = {i: to_bytes(t) for t, i in vocab.items() if all(c in decode for c in t)}
    return ranks, id_bytes


def merge_fuzz(spec: dict, ranks: dict[bytes, int], id_bytes: dict[int, bytes], pieces: int, seed: int = 0) -> dict:
    """Both engines' BPE on single pieces (no pre-tokenizer): how many of them get different tokens."""
    import random

    import tiktoken
    from tokenizers import Tokenizer, models

    printable = {byte: char for char, byte in byte_decoder().items()}
    merges = merge_pairs(spec)
    hf = Tokenizer(models.BPE(vocab=spec["model"]["vocab"], merges=merges))
    whole = tiktoken.Encoding("whole", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
    by_rank = {rank: piece for piece, rank in ranks.items()}
    tokens = list(ranks)
    own_cut = {id_bytes[spec["model"]["vocab"][a + b]]: len(id_bytes[spec["model"]["vocab"][a]]) for a, b in merges}
    other_splits = [  # (token, left, right): another split into two tokens than the token's own merge
        (token, token[:k], token[k:])
        for token, cut in own_cut.items()
        for k in range(1, len(token))
        if k != cut and token[:k] in ranks and token[k:] in ranks
    ]
    rng = random.Random(seed)
    samples = [b"".join(rng.choice(tokens) for _ in range(rng.randint(2, 5))) for _ in range(pieces)]
    for token, left, right in other_splits:
        for _ in range(2000):
            samples.append(rng.choice(tokens) + token + rng.choice(tokens))
            samples.append(rng.choice(tokens) + left + right + rng.choice(tokens))
    differing = 0
    for sample in samples:
        ours = [id_bytes[i] for i in hf.encode("".join(printable[b] for b in sample)).ids]
        theirs = [by_rank[r] for r in whole._encode_bytes(sample)]  # bytes in: a piece need not be valid UTF-8
        differing += ours != theirs
    return {"pieces": len(samples), "differing": differing, "tokens_with_other_splits": len(other_splits)}


def timed(encode, repeats: int) -> tuple[float, list[list[bytes]]]:
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = encode()
        best = min(best, time.perf_counter() - start)
    return best, out


def markdown(result: dict) -> str:
    versions, sources = result["versions"], ", ".join(result["sources"])
    lines = [
        f"# BPE engines on one core: HF tokenizers vs tiktoken ({result['date']})",
        "",
        (
            f"{result['machine']}; tokenizers {versions['tokenizers']}, tiktoken {versions['tiktoken']}, Python "
            f"{versions['python']}. {result['mb']:.1f} MB of Chinese text ({result['docs']} documents: {sources}), "
            f"byte-level BPE of {result['vocab_size']} tokens ({result['tokenizer']}); one core, one thread, best of "
            f"{result['repeats']}."
        ),
        "",
        "| side | pre-tokenizer | MB/s | tokens per MB | identical documents |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, side in result["sides"].items():
        lines.append(
            f"| {name} | {side['pre_tokenizer']} | {side['mb_per_sec']:.2f} | {side['tokens_per_mb']:,.0f} | "
            f"{side.get('identical', '')} |"
        )
    lines += ["", f"One regex: `{result['one_regex']}`", ""]
    if result.get("fuzz"):
        fuzz = result["fuzz"]
        lines += [
            (
                f"The merges alone: {fuzz['differing']} of {fuzz['pieces']:,} single pieces got different tokens "
                f"({fuzz['tokens_with_other_splits']} merged tokens also split into two other tokens)."
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="a byte-level lmlab tokenizer folder (default: train one)")
    parser.add_argument("--train-mb", type=float, default=4.0, help="MB of the corpus to train the default on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fuzz", type=int, default=100_000, help="random pieces for the merges-alone check (0: none)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    import tempfile

    import tiktoken
    from tokenize_throughput import SOURCES, chinese_docs, train_tokenizer
    from tokenizers import Tokenizer

    from lmlab.core.tokenizer import byte_pieces_regex

    docs = chinese_docs()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.tokenizer or Path(tmp) / "tokenizer"
        if args.tokenizer is None:
            train_tokenizer(docs, folder, args.train_mb)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])
    if spec["model"]["type"] != "BPE" or [s["type"] for s in steps] != ["Split", "ByteLevel"]:
        parser.error(f"{folder}: needs a byte-level BPE whose pre-tokenizer is one regex (trained since 2026-12-01)")
    one_regex = steps[0]["pattern"]["Regex"]
    if one_regex != byte_pieces_regex(True, True, 16):  # sequence_before() has conf/bpe/byte.yaml's settings
        parser.error(f"{folder}: trained with other settings than conf/bpe/byte.yaml's (pieces {one_regex!r})")
    ranks, id_bytes = bpe_ranks(spec)
    hf = Tokenizer.from_str(json.dumps(spec))
    before = Tokenizer.from_str(json.dumps(spec))
    before.pre_tokenizer = sequence_before()
    engine = tiktoken.Encoding("one_regex", pat_str=one_regex, mergeable_ranks=ranks, special_tokens={})
    by_rank = {rank: piece for piece, rank in ranks.items()}
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    def hf_side(tokenizer: Tokenizer):
        def encode() -> list[list[bytes]]:
            out = []
            for i in range(0, len(docs), 1000):  # tokenize_throughput's raw anchor: batches of 1000 documents
                out += [e.ids for e in tokenizer.encode_batch_fast(docs[i : i + 1000], add_special_tokens=False)]
            return out

        return encode

    runs = {
        "hf_sequence": ("the sequence before 2026-12-01", hf_side(before)),
        "hf": ("one regex (the tokenizer's)", hf_side(hf)),
        "tiktoken": ("one regex", lambda: [engine.encode_ordinary(d) for d in docs]),
    }
    sides, pieces = {}, {}
    for name, (pre, encode) in runs.items():
        seconds, ids = timed(encode, args.repeats)
        table = by_rank if name == "tiktoken" else id_bytes
        pieces[name] = [[table[i] for i in doc] for doc in ids]
        sides[name] = {
            "pre_tokenizer": pre,
            "seconds": seconds,
            "mb_per_sec": mb / seconds,
            "tokens_per_mb": sum(map(len, ids)) / mb,
        }
        print(name, sides[name], flush=True)

    def same(a: str, b: str) -> str:
        count = sum(x == y for x, y in zip(pieces[a], pieces[b], strict=True))
        return f"{count} / {len(docs)} with {b}"

    sides["hf"]["identical"] = same("hf", "hf_sequence")
    sides["tiktoken"]["identical"] = same("tiktoken", "hf")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {
            "tokenizers": version("tokenizers"),
            "tiktoken": version("tiktoken"),
            "python": platform.python_version(),
        },
        "tokenizer": str(args.tokenizer) if args.tokenizer else f"trained on the first {args.train_mb} MB",
        "vocab_size": len(spec["model"]["vocab"]),
        "sources": SOURCES,
        "docs": len(docs),
        "mb": mb,
        "repeats": args.repeats,
        "one_regex": one_regex,
        "sides": sides,
        "fuzz": merge_fuzz(spec, ranks, id_bytes, args.fuzz) if args.fuzz else None,
    }
    out = Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['date']}_cpu_tokenizer_engines"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
