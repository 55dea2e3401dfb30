"""Evaluate a run folder or HF folder, causal or T5: `python eval.py run=<dir> data=<preset> task=<task>`.

Tasks (lmlab/eval/tasks.py): ppl (text set), sft (response loss and token accuracy), rouge (generated replies against
the references, conf/generation settings), judge (replies scored 0-100 by a judge model). Writes eval.json and
eval.md (plus predictions.jsonl or judge_scores.jsonl) into ``out_dir`` (default ``<run>/eval/<task>_<data>_<split>``),
prints the table and logs the metrics to a wandb run in the run's project (offline unless WANDB_MODE=online).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmlab.core.runs import register_resolvers
from lmlab.eval.tasks import TASKS, connected_data, eval_record, markdown, write_outputs
from lmlab.infer.generation import load_for_inference

log = logging.getLogger("lmlab.eval")
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_SILENT", "true")
register_resolvers()


def run_project(run: str) -> str | None:
    """The wandb project the run was trained under, from its saved config."""
    saved = Path(run) / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    project = OmegaConf.select(OmegaConf.load(saved), "logger.wandb.project")
    return project if isinstance(project, str) else None


def log_wandb(cfg: DictConfig, record: dict[str, Any], out_dir: Path) -> None:
    """One wandb run (job_type eval) holding the metrics; any wandb failure only warns, eval.json is already written."""
    try:
        import wandb

        project = cfg.wandb.project or run_project(cfg.run) or "lmlab"
        run = wandb.init(
            project=project,
            name=f"eval-{cfg.task}-{Path(cfg.run).resolve().name}",
            job_type="eval",
            dir=str(out_dir),
            mode="offline" if cfg.wandb.offline else "online",
            config={k: v for k, v in record.items() if k != "metrics"},
            tags=["eval", cfg.task],
        )
        run.log({f"eval/{k}": v for k, v in record["metrics"].items() if v is not None})
        run.finish()
    except Exception as e:  # noqa: BLE001 - logging is a convenience; the results are on disk
        log.warning("wandb logging failed (%s: %s); results are in %s", type(e).__name__, e, out_dir)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.task`` and write its outputs; returns the eval.json record."""
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}: choose one of {list(TASKS)}")
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype, cfg.template.chat_template)
    dm = connected_data(cfg, model, tokenizer)
    result = TASKS[cfg.task](cfg, model, tokenizer, dm)
    files = dm.val_files if cfg.split == "val" and dm.val_files else dm.train_files
    data = {
        "preset": HydraConfig.get().runtime.choices.data,
        "split": cfg.split,
        "files": [str(f) for f in files],
        "limit": cfg.limit,
        "seq_len": cfg.seq_len,
    }
    record = eval_record(cfg.task, str(cfg.run), data, result)
    out_dir = Path(cfg.out_dir)
    write_outputs(out_dir, record, result)
    if cfg.wandb.enabled:
        log_wandb(cfg, record, out_dir)
    print(markdown(record))
    print(f"wrote {out_dir / 'eval.json'}")
    return record


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
