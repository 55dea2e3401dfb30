"""DPO training throughput (pairs/s) and peak GPU memory: lmlab's DPOModule against TRL's DPOTrainer.

Everything runs in one process, one side after the other, on the same data, tokenizer and starting weights:

- Data: ``--pairs`` synthetic preference pairs (seeded random words from a fixed list of made-up two-syllable
  words): a prompt of about ``--prompt-words`` words, chosen and rejected answers of about ``--answer-words``
  words each (each length varies by +-10%), one user turn answered by the assistant. A byte-level BPE
  (``lmlab.core.tokenizer.train_bpe``, conf/bpe/byte.yaml with ``--vocab-size``, the chatml template) is trained on
  that text (it stops near 5.5k tokens, once every word is one token), and a ``model=<preset>`` is built for it
  (``lmlab.core.models.build_model``); where ``--vocab-size`` is larger than the tokenizer (``--vocab-size 50257``:
  GPT-2's), its embedding table and tied head are resized to it (``resize_token_embeddings``): the extra rows are
  never a target, but every logits row then has GPT-2's width, which is what the vocabulary costs a DPO step.
  It is exported once (``export_hf``): both sides load that folder, so they start
  from identical weights and tokenize identically. The token counts each side sees are recorded, and the pairs
  whose token ids are identical on both sides are counted (all of them, with the chatml template).
- lmlab: the config ``python train.py stage=dpo model=<preset> trainer=gpu init_from=<exported>`` composes
  (``trainer=cpu`` without a GPU; ``batch_size``, ``beta``, ``seq_len``, ``compile`` from the arguments,
  ``logger=csv``; no validation, no checkpoints, no other callbacks), built as train.py builds it, once with
  ``stage.module.reference=copy`` (a live frozen reference) and once with ``precomputed`` (its log-probs
  computed before training, then the reference is freed). The answers' log-probs come from the fused LM head
  formed (the config's default); ``--frameworks lmlab,lmlab_fused,trl`` runs both again with the fused LM head
  (``lmlab_fused``: ``stage.module.fused_lm_head=true``), and a list without ``trl`` skips TRL's sides.
- TRL: ``DPOTrainer`` with a ``DPOConfig`` matching that config: batch size, beta, sigmoid loss, lr, AdamW
  betas, weight decay, warmup, grad clip 1.0, bf16 (GPU), fused AdamW (TRL's default), padding to the same
  multiple, the same data-loader workers, no gradient checkpointing (TRL's default is on; lmlab has none),
  ``torch_compile`` as ``--compile``; no eval, no saving, ``report_to="none"``; the reference is the
  trainer's own copy (``ref_model=None``), once live and once with ``precompute_ref_log_probs=True``.

Each side trains ``--steps`` optimizer steps; pairs/s is ``batch_size x (steps - warmup)`` over the wall time
from the end of step ``--warmup`` to the end of the last step, the GPU synchronized at both ends (a Lightning
Callback / a TrainerCallback). Peak memory is ``torch.cuda.max_memory_allocated``: "setup" from the start of
the side to the start of training (model loading, the precomputation), "train" over the training steps.
The mean padded width of the batches each side fed its model is recorded too (2 x batch rows, chosen then
rejected; lmlab's are one position shorter, as its labels come pre-shifted).
Prints a JSON object and a markdown table; ``--out PATH`` writes ``PATH.json`` and ``PATH.md`` (after each
side, so a cut-off run keeps what it measured), by default ``$OUT/<date>_<gpu>_<preset>_dpo_throughput``
when ``$OUT`` is set.

    python benchmarks/dpo_throughput.py                # GPU: gpt2, 512 pairs, batch 8, 60 steps (10 warmup)
    python benchmarks/dpo_throughput.py --compile      # both sides torch.compile'd
    python benchmarks/dpo_throughput.py --smoke        # CPU check (~1 min): gpt2-tiny, 32 short pairs, 6 steps

Needs trl (>= 1.16) and datasets besides the repo's requirements.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PROJECT_ROOT", str(REPO))

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES]  # 4900 made-up words
VAL_PAIRS = 8  # lmlab's datamodule needs a validation file; it is never evaluated
REFERENCES = ("copy", "precomputed")
LMLAB = {"lmlab": [], "lmlab_fused": ["stage.module.fused_lm_head=true"]}  # lmlab's sides: their extra overrides

log = logging.getLogger("dpo_throughput")

from gpu_throughput import share_lmlab_allocator  # noqa: E402
from trl_anchor import StepClock, cuda, hf_clock, lmlab_trainer_args, require_trl  # noqa: E402  (this folder, beside this script)


def synthetic_pairs(n: int, prompt_words: int, answer_words: int, seed: int) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} records of seeded random words, each about the given number of words long."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choices(WORDS, k=round(words * rng.uniform(0.9, 1.1))))

    return [
        {"prompt": text(prompt_words), "chosen": text(answer_words), "rejected": text(answer_words)} for _ in range(n)
    ]


class LightningClock(L.Callback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.train_start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.clock.widths.append(batch["input_ids"].shape[1])
        self.clock.step_end(trainer.global_step)


def token_stats(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict:
    """Mean and max tokens of the prompts, the answers (with their end token) and whole sequences."""
    prompt = [len(p) for p, _, _ in pairs]
    answers = [len(a) for _, c, r in pairs for a in (c, r)]
    sequences = [len(p) + len(a) for p, c, r in pairs for a in (c, r)]
    return {
        name: {"mean": round(sum(v) / len(v), 1), "max": max(v)}
        for name, v in (("prompt", prompt), ("answer", answers), ("sequence", sequences))
    }


def compose_cfg(args: argparse.Namespace, work: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "stage=dpo",
                f"model={args.preset}",
                f"trainer={'gpu' if cuda() else 'cpu'}",
                "logger=csv",
                f"batch_size={args.batch_size}",
                f"beta={args.beta}",
                f"seq_len={args.seq_len}",
                "lr=5e-6",
                "min_lr=5e-7",
                "warmup_steps=5",  # GPT2-SFT's DPO lr (the default 3e-3 is for tiny pretraining)
                f"compile={str(args.compile).lower()}",
                f"bpe.vocab_size={args.vocab_size}",
                f"paths.output_dir={work / 'run'}",
                f"paths.cache_dir={work / 'cache'}",
                *overrides,
            ],
        )


def lmlab_overrides(args: argparse.Namespace, work: Path, reference: str, framework: str = "lmlab") -> list[str]:
    return [
        *LMLAB[framework],
        f"init_from={work / 'init'}",
        f"tokenizer={work / 'init'}",
        f"max_steps={args.steps}",
        f"data.train_files=[{work / 'train.jsonl'}]",
        f"data.val_files=[{work / 'val.jsonl'}]",
        f"stage.module.reference={reference}",
        "trainer.limit_val_batches=0",
        "+trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.output_dir={work / f'{framework}_{reference}'}",
        *args.override,
    ]


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Write the pairs, train the tokenizer, build and export the starting model into work/init."""
    from omegaconf import OmegaConf

    from lmlab.core.models import build_model, count_parameters, export_hf
    from lmlab.core.tokenizer import train_bpe

    records = synthetic_pairs(args.pairs + VAL_PAIRS, args.prompt_words, args.answer_words, seed=0)
    train, val = records[: args.pairs], records[args.pairs :]
    for name, rows in (("train", train), ("val", val)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg(args, work, [])
    L.seed_everything(cfg.seed)
    tokenizer = train_bpe(
        (t for r in train for t in r.values()),
        chat_template=cfg.template.chat_template,
        **OmegaConf.to_container(cfg.bpe, resolve=True),
    )
    model = build_model(cfg.model, tokenizer)
    if args.vocab_size > len(tokenizer):
        model.resize_token_embeddings(args.vocab_size)
    export_hf(model, tokenizer, work / "init")
    return {
        "parameters": count_parameters(model),
        "vocab_size": model.get_input_embeddings().num_embeddings,
        "tokenizer_size": len(tokenizer),
    }


def run_lmlab(args: argparse.Namespace, work: Path, reference: str, framework: str) -> tuple[dict, list]:
    """lmlab's DPO as train.py builds it from the composed config, timed by a Lightning callback; ``framework``
    lmlab_fused with the fused LM head (``fused_lm_head=true``)."""
    from hydra.utils import instantiate

    from train import attention, build_module, loader_settings, packed_attention

    cfg = compose_cfg(args, work, lmlab_overrides(args, work, reference, framework))
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule, _, _ = build_module(cfg, work)
    clock = StepClock(args.warmup, args.steps)
    trainer = instantiate(
        cfg.trainer, logger=[instantiate(c) for c in cfg.logger.values()], callbacks=[LightningClock(clock)]
    )
    with attention(cfg):  # as train.py runs it; TRL's side gets torch's own backends
        trainer.fit(module, datamodule=datamodule)

    pairs = []
    for item in datamodule.train_set:
        split = []
        for side in ("chosen", "rejected"):
            ids, n_prompt = item[side]["input_ids"].tolist(), int((item[side]["labels"] == -100).sum())
            split.append((ids[:n_prompt], ids[n_prompt:]))
        assert split[0][0] == split[1][0], "chosen and rejected have different prompts"
        pairs.append((split[0][0], split[0][1], split[1][1]))
    longest = max(len(p) + len(a) for p, c, r in pairs for a in (c, r))
    assert longest < args.seq_len, f"a sequence of {longest} tokens may have been cut to seq_len={args.seq_len}"
    result = {
        **clock.result(args.batch_size),
        "overrides": lmlab_overrides(args, Path("<tmp>"), reference, framework),
        "precision": cfg.trainer.precision,
        "cudnn_sdpa": cfg.cudnn_sdpa,
        "packing": cfg.packing,
        "packed_attention": packed_attention(cfg),
        "fused_lm_head": cfg.stage.module.fused_lm_head,
        "align_lm_head": cfg.align_lm_head,
        "optimizer_fused": cfg.optim.optimizer.fused,
        **loader_settings(cfg),
    }
    return result, pairs


def run_trl(args: argparse.Namespace, work: Path, reference: str) -> tuple[dict, list]:
    """TRL's DPOTrainer on the same pairs and starting weights, configured like the lmlab run."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lmlab.core.tokenizer import load_tokenizer
    from train import loader_settings

    class RecordingDPOTrainer(DPOTrainer):
        """Hands each training batch's padded width to the clock."""

        def training_step(self, model, inputs, *rest, **kwargs):
            clock.widths.append(inputs["input_ids"].shape[1])
            return super().training_step(model, inputs, *rest, **kwargs)

    cfg = compose_cfg(args, work, lmlab_overrides(args, work, reference))
    loader = loader_settings(cfg)  # what lmlab's run used (num_workers, pad_to_multiple_of)
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    )
    config = DPOConfig(
        output_dir=str(work / f"trl_{reference}"),
        per_device_train_batch_size=args.batch_size,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.seq_len,
        precompute_ref_log_probs=reference == "precomputed",
        max_steps=args.steps,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        bf16=cuda(),
        gradient_checkpointing=False,
        torch_compile=args.compile,
        pad_to_multiple_of=loader["pad_to_multiple_of"] if loader["pad_to_multiple_of"] > 1 else None,
        dataloader_num_workers=loader["num_workers"],
        **lmlab_trainer_args(cfg),
        model_init_kwargs={"attn_implementation": cfg.model.attn_implementation, "dtype": "float32"},
    )
    clock = StepClock(args.warmup, args.steps)
    trainer = RecordingDPOTrainer(
        model=str(work / "init"),
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(work / "init"),
        callbacks=[hf_clock(clock)],
    )
    trainer.train()

    data = trainer.train_dataset
    pairs = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True))
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules())
    result = {
        **clock.result(args.batch_size),
        "bf16": config.bf16,
        "optim": config.optim.value,
        "gradient_checkpointing": checkpointing,
        "pad_to_multiple_of": config.pad_to_multiple_of,
        "num_workers": config.dataloader_num_workers,
    }
    return result, pairs


FRAMEWORKS = (*LMLAB, "trl")  # in running order: TRL's sides last, so the ratios can be computed after them


def sides(frameworks: list[str]) -> list[tuple[str, str]]:
    """(framework, reference) of each side of ``frameworks`` in running order."""
    return [(f, reference) for f in FRAMEWORKS if f in frameworks for reference in REFERENCES]


def side_name(framework: str, reference: str) -> str:
    return f"{framework}_{'live' if reference == 'copy' else 'precomputed'}"


def side_ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    """lmlab's side over TRL's with the same reference: pairs/s and the allocated and reserved peaks (None where
    not measured: no GPU)."""

    def ratio(key: str) -> float | None:
        return ours[key] / theirs[key] if ours.get(key) and theirs.get(key) else None

    return {key: ratio(key) for key in ("pairs_per_sec", "peak_train_gib", "peak_reserved_train_gib")}


def markdown(result: dict) -> str:
    def gib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    setup = (
        f"{result['device']}; {versions}. {result['pairs']} synthetic pairs, batch {result['batch_size']} pairs "
        f"({2 * result['batch_size']} rows), beta {result['beta']}, sigmoid loss, compile={result['compile']}; "
        f"{result['steps']} steps a side, the last {result['steps'] - result['warmup']} timed; vocab "
        f"{result['vocab_size']} (tokenizer {result['tokenizer_size']}), {result['parameters'] / 1e6:.1f}M parameters."
    )
    lines = [f"# DPO throughput: lmlab vs TRL DPOTrainer, {result['preset']} ({result['date']})", "", setup]
    if "identical_pairs" in result["tokens"]:
        tokens = result["tokens"]["lmlab"]
        lines += [
            "",
            (
                f"Tokens per pair (lmlab; TRL's token ids identical for {result['tokens']['identical_pairs']}"
                f"/{result['pairs']} pairs): prompt {tokens['prompt']['mean']}, answer "
                f"{tokens['answer']['mean']} (with its end token), sequence {tokens['sequence']['mean']} "
                f"(max {tokens['sequence']['max']})."
            ),
        ]
    columns = (
        "side",
        "reference",
        "pairs/s",
        "step ms",
        "peak GiB train: allocated / reserved",
        "peak GiB setup",
        "mean width",
        "lmlab / TRL pairs/s",
        "lmlab / TRL peak: allocated / reserved",
    )
    lines += ["", "| " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * (len(columns) - 2)]
    for name, side in result["sides"].items():
        framework, kind = name.rsplit("_", 1)
        trl = result["sides"].get(f"trl_{kind}")
        ratio = side_ratios(side, trl) if framework != "trl" and trl else {}
        speed = f"{ratio['pairs_per_sec']:.3f}" if ratio else ""
        memory = ""
        if ratio.get("peak_train_gib") and ratio.get("peak_reserved_train_gib"):
            memory = f"{ratio['peak_train_gib']:.3f} / {ratio['peak_reserved_train_gib']:.3f}"
        peak = f"{gib(side['peak_train_gib'])} / {gib(side.get('peak_reserved_train_gib'))}"
        lines.append(
            f"| {framework} | {'live copy' if kind == 'live' else 'precomputed'} | {side['pairs_per_sec']:.1f} "
            f"| {side['step_ms']:.1f} | {peak} | {gib(side['peak_setup_gib'])} "
            f"| {side['mean_batch_width']:.1f} | {speed} | {memory} |"
        )
    lines += [
        "",
        "Reserved: the CUDA allocator's reserved peak, the like-for-like one where lmlab replays CUDA graphs "
        "(compile=reduce-overhead), whose memory pool the allocated peak leaves out.",
    ]
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text(markdown(result))
    log.info("wrote %s.{json,md}", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="lmlab model preset (conf/model)")
    parser.add_argument("--pairs", type=int, default=512, help="training pairs (512: 60 steps x 8 in one epoch)")
    parser.add_argument("--prompt-words", type=int, default=100)
    parser.add_argument("--answer-words", type=int, default=170)
    parser.add_argument("--vocab-size", type=int, help="BPE size; the model's, if larger (default 8192; smoke 512)")
    parser.add_argument("--seq-len", type=int, default=384, help="max tokens of prompt + answer (nothing is cut)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per side, warmup included")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation included)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (GPU)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override of lmlab's config, repeatable (e.g. stage.module.logps_chunk_elements=268435456)",
    )
    parser.add_argument(
        "--frameworks",
        default="lmlab,trl",
        help=f"comma-separated sides of {FRAMEWORKS}; lmlab_fused: lmlab with the fused LM head (fused_lm_head=true)",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU check: gpt2-tiny, 32 pairs of ~20/35 words, 6 steps")
    args = parser.parse_args()
    unknown = set(args.frameworks.split(",")) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"--frameworks: unknown {sorted(unknown)}; choose from {FRAMEWORKS}")
    require_trl("dpo_throughput.py")
    if args.smoke:
        args.preset, args.pairs, args.prompt_words, args.answer_words = "gpt2-tiny", 32, 20, 35
        args.seq_len, args.steps, args.warmup, args.compile = 256, 6, 2, False
        args.vocab_size = args.vocab_size or 512
    args.vocab_size = args.vocab_size or 8192
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's progress bar of the reference precomputation
    torch.set_float32_matmul_precision("high")  # as train.train sets it

    import accelerate
    import datasets
    import lightning
    import transformers
    import trl

    from lmlab.core.runs import register_resolvers

    register_resolvers()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    allocator = share_lmlab_allocator(
        ["stage=dpo", f"model={args.preset}", *args.override]
    )  # before anything starts CUDA
    device = torch.cuda.get_device_name() if cuda() else "cpu"
    date = datetime.date.today().isoformat()
    if args.out is None and os.environ.get("OUT"):
        gpu = re.search(r"\b([A-Z]\d{2,4})\b", device)
        args.out = (
            Path(os.environ["OUT"]) / f"{date}_{gpu.group(1).lower() if gpu else 'cpu'}_{args.preset}_dpo_throughput"
        )
    result = {
        "preset": args.preset,
        "command": " ".join(sys.argv),
        "overrides": args.override,
        "cuda_alloc_conf": allocator,
        "device": device,
        "date": date,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "lightning": lightning.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
        "pairs": args.pairs,
        "prompt_words": args.prompt_words,
        "answer_words": args.answer_words,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "beta": args.beta,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "frameworks": args.frameworks.split(","),
        "sides": {},
        "ratios": {},
        "tokens": {},
    }

    with tempfile.TemporaryDirectory(prefix="dpo_bench_") as tmp:
        work = Path(tmp)
        result.update(prepare(args, work))
        tokens = {}
        for framework, reference in sides(result["frameworks"]):
            gc.collect()
            torch._dynamo.reset()
            if cuda():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            name = side_name(framework, reference)
            log.info("%s: starting", name)
            before = torch.cuda.memory_allocated() / 2**30 if cuda() else None
            if framework == "trl":
                side, pairs = run_trl(args, work, reference)
            else:
                side, pairs = run_lmlab(args, work, reference, framework)
            result["sides"][name] = {"allocated_before_gib": before, **side}
            log.info("%s: %s", name, result["sides"][name])
            source = "trl" if framework == "trl" else "lmlab"  # every lmlab side tokenizes alike
            if source not in tokens:
                tokens[source] = pairs
                result["tokens"][source] = token_stats(pairs)
            if framework == "trl":
                theirs = result["sides"][name]
                for ours_name in (side_name(f, reference) for f in LMLAB if side_name(f, reference) in result["sides"]):
                    result["ratios"][ours_name] = side_ratios(result["sides"][ours_name], theirs)
                if "lmlab" in tokens:
                    result["tokens"]["identical_pairs"] = sum(
                        a == b for a, b in zip(tokens["lmlab"], tokens["trl"], strict=True)
                    )
            save(result, args.out)
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
