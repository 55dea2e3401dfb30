"""T5 on LCSTS: the conf/experiment recipe's numbers, read back from its run folders, beside a Lead baseline.

The two training runs are plain train.py runs (each fits in one GPU command):

    python train.py experiment=t5_lcsts_pretrain
    python train.py experiment=t5_lcsts_sft init_from=outputs/pretrain/t5/<run>

This script reads their metrics.csv and rouge.jsonl (the ROUGE of the generations on the 1000 val texts at
each validation) and computes, in the same process and with the same scorer (lmlab.eval.rouge, char segmentation),
the Lead anchor: the first N characters of each text as its summary, N the mean reference length. It prints
JSON and a markdown table, and writes both with --out.

    python benchmarks/t5_lcsts.py --pretrain <run> --sft <run> --device "H100 80GB HBM3" --out results/<name>
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmlab.eval.rouge import rouge_scores

VAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "zh_summarization_lcsts" / "val.tsv"


def read_run(run: Path) -> dict:
    """Steps, training time, throughput, losses and the ROUGE of every validation of one run folder."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def series(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    rouge = (
        [json.loads(line) for line in (run / "rouge.jsonl").read_text().splitlines()]
        if (run / "rouge.jsonl").is_file()
        else []
    )
    tokens_per_sec = [v for _, v in series("train/device/items_per_sec")]
    mfu = [v for _, v in series("train/device/mfu")]
    train_loss, val_loss = series("train/loss"), series("val/loss")
    return {
        "run": run.name,
        "steps": train_loss[-1][0] + 1 if train_loss else 0,
        "train_seconds": series("train/time")[-1][1] if series("train/time") else None,
        "median_tokens_per_sec": sorted(tokens_per_sec)[len(tokens_per_sec) // 2] if tokens_per_sec else None,
        "median_mfu": sorted(mfu)[len(mfu) // 2] if mfu else None,
        "first_train_loss": train_loss[0][1] if train_loss else None,
        "last_train_loss": train_loss[-1][1] if train_loss else None,
        "val_loss": val_loss,
        "rouge": rouge,
    }


def lead_baseline(val: Path) -> dict:
    """ROUGE of the first N characters of each text (N = mean reference length), same scorer."""
    pairs = [line.rstrip("\n").split("\t", 1) for line in val.read_text(encoding="utf-8").splitlines() if line]
    n = round(sum(len(summary) for summary, _ in pairs) / len(pairs))
    scores = rouge_scores([text[:n] for _, text in pairs], [summary for summary, _ in pairs], "char")
    return {"lead_chars": n, **scores}


def table(result: dict) -> str:
    lines = ["| side | steps | train s | ROUGE-1 | ROUGE-2 | ROUGE-L | n |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("pretrain", "sft"):
        run = result[name]
        for r in run["rouge"] if name == "sft" else []:
            lines.append(
                f"| lmlab t5 SFT step {r['step']} | {run['steps']} | {run['train_seconds'] or 0:.0f} | "
                f"{r['rouge1']:.4f} | {r['rouge2']:.4f} | {r['rougeL']:.4f} | {r['n']} |"
            )
    lead = result["lead"]
    lines.append(
        f"| Lead-{lead['lead_chars']} (anchor) | - | - | {lead['rouge1']:.4f} | {lead['rouge2']:.4f} | "
        f"{lead['rougeL']:.4f} | {lead['n']} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", type=Path, required=True)
    parser.add_argument("--sft", type=Path, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--val", type=Path, default=VAL)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    result = {
        "device": args.device,
        "pretrain": read_run(args.pretrain),
        "sft": read_run(args.sft),
        "lead": lead_baseline(args.val),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(table(result))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        args.out.with_suffix(".md").write_text(table(result) + "\n")


if __name__ == "__main__":
    main()
