"""BPE encoding speed on one core: Hugging Face tokenizers against tiktoken, with the same merges (CPU).

Issue 3's target is 5 MB/s of Chinese text per core. This measures what lmlab's byte-level pre-tokenizer and another
engine give, on the corpus of ``tokenize_throughput.py`` (the shared Chinese corpora, each document once), every side
pinned to one core and one thread, best of ``--repeats``, with one tokenizer's merges:

- ``hf_sequence``: tokenizers with the pre-tokenizer lmlab trained before 2026-12-01 (``SEQUENCE_BEFORE``: a
  sequence of punctuation, digits, runs cut at 16 characters, GPT-2's regex). The anchor.
- ``hf``: tokenizers with the tokenizer's own pre-tokenizer, one regex
  (lmlab.core.tokenizer.byte_pieces_regex), then ByteLevel without its own regex.
- ``tiktoken``: lmlab's tiktoken twin of the tokenizer (lmlab.core.tiktoken_twin, what ``prepare_data`` runs under
  ``data.tokenize_engine=auto``): tiktoken with that regex and the merges as ranks (a merge's rank is its order;
  single bytes first), the ranks mapped back to the tokenizer's ids.

Identical token sequences are counted document by document: ``tiktoken`` against ``hf`` (is the other engine exact?)
and ``hf`` against ``hf_sequence`` (how much the one regex changed the tokens), with tokens per MB for each.

The merges alone (``--fuzz N``): the two engines pick merges differently (tokenizers the adjacent pair of lowest merge
rank, tiktoken the adjacent pair whose joined bytes have the lowest token rank, and a whole piece at once when it is a
token), so both encode single pieces made of random vocabulary tokens: N pieces of 2-5 tokens, and 2 x 2000 around
each token that also splits into two other tokens than its merge pair (the token, and that other pair, between two
random tokens), where a difference would show first. Writes ``<date>_cpu_tokenizer_engines.{json,md}`` into
``$OUT`` (else the current folder).

    python benchmarks/tokenizer_engines.py [--tokenizer <folder>] [--repeats 2]
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

from tokenizers import Tokenizer, models  # noqa: E402  (after the thread settings)

from lmlab.core.tiktoken_twin import TiktokenTwin, bpe_merges  # noqa: E402


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


def merge_fuzz(hf: Tokenizer, twin: TiktokenTwin, pieces: int, seed: int = 0) -> dict:
    """Both engines' BPE on single pieces (no pre-tokenizer): how many of them get different tokens. tiktoken's side
    is lmlab's twin (lmlab.core.tiktoken_twin), the tokenizers side the tokenizer's merges alone."""
    import random

    import tiktoken

    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    merges = bpe_merges(spec["model"])
    plain = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rank_of = {int(token_id): rank for rank, token_id in enumerate(twin.ids)}
    token_bytes = {
        token: twin.encoding.decode_single_token_bytes(rank_of[i]) for token, i in vocab.items() if i in rank_of
    }
    printable = {bytes([b]): hf.id_to_token(int(twin.ids[b])) for b in range(256)}  # ByteLevel's stand-ins
    tokens = list(token_bytes.values())
    known = set(tokens)
    own_cut = {token_bytes[a + b]: len(token_bytes[a]) for a, b in merges}
    other_splits = [  # (token, left, right): another split into two tokens than the token's own merge
        (token, token[:k], token[k:])
        for token, cut in own_cut.items()
        for k in range(1, len(token))
        if k != cut and token[:k] in known and token[k:] in known
    ]
    rng = random.Random(seed)
    samples = [b"".join(rng.choice(tokens) for _ in range(rng.randint(2, 5))) for _ in range(pieces)]
    for token, left, right in other_splits:
        for _ in range(2000):
            samples.append(rng.choice(tokens) + token + rng.choice(tokens))
            samples.append(rng.choice(tokens) + left + right + rng.choice(tokens))
    # the twin's ranks with a regex that keeps every sample one piece (the twin's own would cut 16-letter runs)
    whole = tiktoken.Encoding(
        "whole", pat_str=r"[\s\S]+", mergeable_ranks=twin.encoding._mergeable_ranks, special_tokens={}
    )
    differing = 0
    for sample in samples:
        ours = plain.encode("".join(printable[sample[i : i + 1]] for i in range(len(sample)))).ids
        theirs = twin.ids[whole._encode_bytes(sample)].tolist()  # bytes in: a piece need not be valid UTF-8
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

    from tokenize_throughput import SOURCES, chinese_docs, train_tokenizer

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
    hf = Tokenizer.from_str(json.dumps(spec))
    before = Tokenizer.from_str(json.dumps(spec))
    before.pre_tokenizer = sequence_before()
    twin = TiktokenTwin(hf)
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
        "tiktoken": ("one regex", lambda: [ids.tolist() for ids in twin.encode_batch(docs)]),
    }
    sides, encoded = {}, {}
    for name, (pre, encode) in runs.items():
        seconds, ids = timed(encode, args.repeats)
        encoded[name] = ids
        sides[name] = {
            "pre_tokenizer": pre,
            "seconds": seconds,
            "mb_per_sec": mb / seconds,
            "tokens_per_mb": sum(map(len, ids)) / mb,
        }
        print(name, sides[name], flush=True)

    def same(a: str, b: str) -> str:
        count = sum(x == y for x, y in zip(encoded[a], encoded[b], strict=True))
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
        "fuzz": merge_fuzz(hf, twin, args.fuzz) if args.fuzz else None,
    }
    out = Path(os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['date']}_cpu_tokenizer_engines"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
