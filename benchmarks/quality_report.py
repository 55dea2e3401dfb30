"""The quality report of issue 13: train each Chinese recipe as a user would, evaluate it on data it never saw.

    python benchmarks/quality_report.py                       # zh_chat, zh_title, zh_lcsts on one GPU
    python benchmarks/quality_report.py --recipes zh_title --backbone outputs/report/pretrain
    python benchmarks/quality_report.py --tiny                 # the CPU-size twins (seconds; what the test runs)

Stages run as subprocesses of the real entry points (``train.py experiment=...``, ``eval.py``), chained by
``init_from``; each stage's wall time is measured. What is reported:

- pretrain: the last val loss per source (``val/loss/<source>``), train and val loss at the end, and the run's
  summary.json (tokens seen, epochs, parameters, tokens per parameter);
- SFT: response perplexity on the held-out Chinese Alpaca rows of the chat mixture (``eval.py task=sft
  source=zh_alpaca``), next to the pretrain-only model's; the 20 fixed prompts of benchmarks/prompts/zh_chat_20.txt
  answered at the recipe's sampling settings, with distinct-2 and the share caught in a repetition loop (every
  answer is in the report);
- CSL titles and LCSTS summaries: char ROUGE-1/2/L F1 of beam-search outputs on CSL dev / LCSTS val.

The report (``<out>.json`` and ``<out>.md``: date, device, versions, commands, wall time per stage) is rewritten
after every stage, so a run stopped midway still leaves what it measured.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "benchmarks" / "prompts" / "zh_chat_20.txt"
# recipe -> stages: (stage name, experiment preset, the stage whose run it starts from)
RECIPES: dict[str, list[tuple[str, str, str | None]]] = {
    "zh_chat": [("pretrain", "zh_chat_pretrain", None), ("sft", "zh_chat_sft", "pretrain")],
    "zh_title": [("pretrain", "zh_chat_pretrain", None), ("title", "zh_title", "pretrain")],
    "zh_lcsts": [("pretrain", "zh_chat_pretrain", None), ("lcsts", "zh_lcsts", "pretrain")],
}
TARGETS = {
    "sft_ppl_max": 30.0,
    "loop_share_max": 0.10,
    "csl_rouge1_min": 0.567,
    "lcsts_rouge1_min": 0.25,
    "gap_max_nats": 0.3,
}


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's metrics.csv."""
    last: dict[str, float] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            last.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")})
    return last


@dataclass
class Report:
    """One report run: where runs go, the overrides every command gets, and what was measured so far."""

    work: Path
    out: Path
    tiny: bool
    common: list[str]
    commands: list[str] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)

    def run(self, cmd: list[str], log_name: str) -> float:
        """Run an entry point from the repo root, its output in a log; returns its wall time, raises on failure."""
        cmd = [*cmd, *self.common]
        self.commands.append("python " + " ".join(cmd))
        log = self.work / log_name
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
        return round(time.perf_counter() - start, 1)

    def train(self, name: str, experiment: str, init_from: Path | None, overrides: list[str]) -> tuple[Path, float]:
        """``train.py experiment=<experiment>`` into ``<work>/<name>``; the run folder and its wall time."""
        run_dir = self.work / name
        cmd = ["train.py", f"experiment={experiment}", f"paths.output_dir={run_dir}", "logger=csv", *overrides]
        if init_from is not None:
            cmd.append(f"init_from={init_from}")
        return run_dir, self.run(cmd, f"train_{name}.log")

    def evaluate(self, run_dir: Path, name: str, args: list[str]) -> dict[str, Any]:
        """``eval.py run=<run_dir> <args>`` into ``<run_dir>/eval/<name>``; its eval.json record with the wall time."""
        out = run_dir / "eval" / name
        limit = ["limit=8"] if self.tiny else []
        seconds = self.run(
            ["eval.py", f"run={run_dir}", *args, *limit, f"out_dir={out}", "wandb.enabled=false", "progress=false"],
            f"eval_{run_dir.name}_{name}.log",
        )
        return {**json.loads((out / "eval.json").read_text(encoding="utf-8")), "wall_s": seconds}

    def measure(self, name: str, run_dir: Path, runs: dict[str, Path]) -> dict[str, Any]:
        """The numbers issue 13 asks of a stage's model."""
        summary = run_dir / "summary.json"
        out: dict[str, Any] = {
            "run": str(run_dir),
            "last": last_metrics(run_dir),
            "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        }
        tokens = "8" if self.tiny else None
        if name == "sft":
            heldout = (
                ["task=sft", "data=sample_sft"] if self.tiny else ["task=sft", "data=zh_chat_sft", "source=zh_alpaca"]
            )
            out["sft_eval"] = self.evaluate(run_dir, "sft_alpaca", heldout)
            out["pretrain_only_sft_eval"] = self.evaluate(runs["pretrain"], "sft_alpaca", heldout)
            out["chat"] = self.evaluate(
                run_dir,
                "chat20",
                ["task=chat", f"prompts={PROMPTS}", "generation=sample", f"generation.max_new_tokens={tokens or 256}"],
            )
        elif name in ("title", "lcsts"):
            data = "sample_sft" if self.tiny else ("csl_title" if name == "title" else "lcsts_plus")
            out["rouge"] = self.evaluate(
                run_dir,
                f"rouge_{data}",
                [
                    "task=rouge",
                    f"data={data}",
                    "generation=beam",
                    f"generation.max_new_tokens={tokens or 64}",
                    "batch_size=64",
                ],
            )
        return out

    def write(self, recipes: list[str]) -> None:
        """``<out>.json`` and ``<out>.md`` with everything measured so far."""
        record = {
            "date": datetime.date.today().isoformat(),
            "device": device_name(),
            "tiny": self.tiny,
            "recipes": recipes,
            "versions": versions(),
            "targets": TARGETS,
            "stages": self.stages,
            "commands": self.commands,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".json").write_text(
            json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        self.out.with_suffix(".md").write_text(markdown(record), encoding="utf-8")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Quality report ({report['date']}, {report['device']})",
        "",
        f"- versions: {json.dumps(report['versions'])}",
        f"- tiny: {report['tiny']}",
        "",
        "| stage | wall s | numbers |",
        "| --- | ---: | --- |",
    ]
    for name, stage in report["stages"].items():
        nums: dict[str, Any] = {
            k: round(v, 4)
            for k, v in stage["last"].items()
            if k.startswith(("val/loss", "val/rouge")) or k == "train/loss"
        }
        for key in ("sft_eval", "pretrain_only_sft_eval", "chat", "rouge"):
            if key in stage:
                nums[key] = {k: round(v, 4) for k, v in stage[key]["metrics"].items() if v is not None}
        lines.append(f"| {name} | {stage['wall_s']} | `{json.dumps(nums, ensure_ascii=False)}` |")
    if "chat" in report["stages"].get("sft", {}):
        rows = Path(report["stages"]["sft"]["run"]) / "eval" / "chat20" / "replies.jsonl"
        lines += ["", "## The 20 chat answers", "", "| prompt | answer | loop |", "| --- | --- | --- |"]
        for row in map(json.loads, rows.read_text(encoding="utf-8").splitlines()):
            answer = row["output"].replace("\n", "⏎").replace("|", "\\|")
            lines.append(f"| {row['question']} | {answer} | {'yes' if row['loop'] else ''} |")
    lines += ["", "## Commands", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def versions() -> dict[str, str | None]:
    return {
        **{p: version(p) for p in ("torch", "transformers", "lightning", "tokenizers")},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--tiny", action="store_true", help="the *_tiny twins on the bundled data (CPU)")
    parser.add_argument("--backbone", type=Path, help="a finished pretrain run to start from (skips pretraining)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "report", help="run folders")
    parser.add_argument("--out", type=Path, help="report path without suffix (default: benchmarks/results/...)")
    parser.add_argument("--data-dir", type=Path, help="where the shared datasets are (default: ../shared/data)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training stage")
    args = parser.parse_args()

    kind = "tiny" if args.tiny else device_name().split()[-1].lower()
    out = args.out or REPO / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}_{kind}_quality"
    args.work.mkdir(parents=True, exist_ok=True)
    report = Report(
        args.work.resolve(), out, args.tiny, [f"paths.data_dir={args.data_dir.resolve()}"] if args.data_dir else []
    )
    runs: dict[str, Path] = {"pretrain": args.backbone.resolve()} if args.backbone else {}
    for recipe in args.recipes:
        for name, experiment, parent in RECIPES[recipe]:
            if name in runs:  # the recipes share one pretrained backbone
                continue
            init_from = runs[parent] if parent else None
            runs[name], seconds = report.train(
                name, experiment + ("_tiny" if args.tiny else ""), init_from, args.overrides
            )
            report.stages[name] = {"wall_s": seconds, **report.measure(name, runs[name], runs)}
            report.write(args.recipes)
    print(markdown(json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
