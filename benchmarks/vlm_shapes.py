"""stage=vlm on the generated shapes set (data=shapes): accuracy per question type, and babyllama's comparison of
freeze policies (train everything, freeze the language model, freeze the vision tower, train the projector alone).

    python benchmarks/vlm_shapes.py [overrides...] [--steps 1500] [--lm-steps 400]
        [--policies all language vision vision,language] [--vlm vision=clip-small lr=3e-4]

Overrides for every run come first (--policies and --vlm take the words after them); the H200 report:
``python benchmarks/vlm_shapes.py trainer=gpu model=llama-26m --steps 2000 --lm-steps 600 --vlm vision=clip-small
lr=3e-4``.

First a language model learns the set's questions and answers as text alone (stage=sft on the same records, images
left out): it knows the words, not the pictures, as babyllama's pretrained LLaMA did. Then for each policy a
stage=vlm run starts from it (init_from) with a new vision tower and projector (``vision=``, random unless
``vision.from`` names a pretrained one), and eval.py task=vqa scores its greedy answers on the val pictures (none
of them in training) by exact match, per question type, with the images and with every image zeroed
(``blank_image``), next to the blind baseline (each question's most frequent training answer). Stages run as
subprocesses of the real entry points. Writes ``<out>.json`` and ``<out>.md`` (date, device, versions, commands,
wall time per run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import REPO, Report, device_name, versions  # noqa: E402

POLICIES = {  # name -> stage.module.freeze
    "all": [],
    "language": ["language"],
    "vision": ["vision"],
    "vision,language": ["vision", "language"],
}
SHAPES = ["data.train_files=[${paths.root_dir}/data/shapes/train.parquet]"]
VAL = ["data.val_files=[${paths.root_dir}/data/shapes/val.parquet]"]


def text_model(report: Report, steps: int, overrides: list[str]) -> tuple[Path, float]:
    """The language model: SFT on the shapes questions and answers as text (the records' images are not read)."""
    run_dir = report.work / "text_lm"
    data = ["data=sample_sft", *SHAPES, *VAL]
    cmd = ["train.py", "stage=sft", *data, f"max_steps={steps}", f"paths.output_dir={run_dir}", *overrides]
    return run_dir, report.run(cmd, "train_text_lm.log")


def policy_run(report: Report, name: str, lm: Path, steps: int, overrides: list[str]) -> dict[str, Any]:
    """One stage=vlm run from ``lm`` with the policy's parts frozen, and its task=vqa scores with and without images.
    ``overrides`` may hold ``vision=``, which only a stage=vlm run takes."""
    run_dir = report.work / f"vlm_{name.replace(',', '+')}"
    freeze = "[" + ",".join(POLICIES[name]) + "]"
    cmd = ["train.py", "stage=vlm", f"init_from={lm}", f"stage.module.freeze={freeze}", f"max_steps={steps}"]
    seconds = report.run([*cmd, f"paths.output_dir={run_dir}", *overrides], f"train_vlm_{name}.log")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    scores = {
        blank: report.evaluate(run_dir, f"vqa_blank_{blank}", ["task=vqa", "data=shapes", f"blank_image={blank}"])
        for blank in ("false", "true")
    }
    return {
        "run": str(run_dir),
        "freeze": POLICIES[name],
        "train_s": seconds,
        "trainable_parameters": summary["trainable_parameters"],
        "parameters": summary["parameters"],
        "val_loss": (summary.get("best") or {}).get("value"),
        "vqa": scores["false"]["metrics"],
        "vqa_blank_image": scores["true"]["metrics"],
    }


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    types = sorted(
        {key.split("/")[1] for p in report["policies"].values() for key in p["vqa"] if key.startswith("acc/")}
    )
    lines = [
        f"# stage=vlm on the shapes set, {report['device']}, {report['date']}",
        "",
        f"- versions: {json.dumps(report['versions'])}",
        f"- language model: text-only SFT of {report['lm_steps']} steps ({report['lm_train_s']} s); each policy "
        f"{report['steps']} stage=vlm steps from it with {' '.join(report['vlm_overrides']) or 'no more overrides'}; "
        f"overrides of every run: {' '.join(report['overrides']) or 'none'}",
        "- exact-match accuracy of greedy answers on the 400 val questions (new scenes; 14 pictures equal a training "
        "one); blind: each question's most frequent training answer; blank: every image zeroed",
        "",
        "| frozen | trainable | val loss | acc | " + " | ".join(types) + " | blank acc | blind acc | train s |",
        "|---|---:|---:|---:|" + "---:|" * len(types) + "---:|---:|---:|",
    ]
    for name, p in report["policies"].items():
        per_type = " | ".join(f"{p['vqa'][f'acc/{t}']:.3f} ({p['vqa'][f'blind_acc/{t}']:.2f})" for t in types)
        lines.append(
            f"| {name if p['freeze'] else 'nothing'} | {p['trainable_parameters']:,} | {_number(p['val_loss'])} | "
            f"{p['vqa']['acc']:.3f} | {per_type} | {p['vqa_blank_image']['acc']:.3f} | {p['vqa']['blind_acc']:.3f} | "
            f"{p['train_s']} |"
        )
    lines += ["", "Per type: accuracy (blind baseline).", "", "## Commands", "", "```", *report["commands"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="stage=vlm steps per policy")
    parser.add_argument("--lm-steps", type=int, default=400, help="text-only SFT steps of the language model")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--vlm", nargs="+", default=[], help="Hydra overrides for the stage=vlm runs only (vision=...)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "vlm_shapes", help="run folders")
    parser.add_argument("--out", type=Path, help="report path without suffix (default: benchmarks/results/...)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training run (e.g. trainer=gpu)")
    args = parser.parse_args()

    kind = device_name().split()[-1].lower() if "CPU" not in device_name() else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}_{kind}_vlm_shapes"
    args.work.mkdir(parents=True, exist_ok=True)
    report = Report(args.work, out, tiny=False, common=[])
    common = ["logger=csv", "lr=1e-3", *args.overrides]
    lm, lm_seconds = text_model(report, args.lm_steps, common)
    record: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "versions": versions(),
        "steps": args.steps,
        "lm_steps": args.lm_steps,
        "lm_train_s": lm_seconds,
        "overrides": args.overrides,
        "vlm_overrides": args.vlm,
        "policies": {},
        "commands": report.commands,
    }
    for name in args.policies:
        record["policies"][name] = policy_run(report, name, lm, args.steps, [*common, *args.vlm])
        out.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        out.with_suffix(".md").write_text(markdown(record), encoding="utf-8")
        print(f"{name}: acc {record['policies'][name]['vqa']['acc']:.3f}", flush=True)
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
