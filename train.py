"""Train: `python train.py model=<family> stage=<objective> data=<preset> [overrides]`.

Composes conf/train.yaml, builds tokenizer -> data -> model -> LightningModule -> Trainer from
their `_target_`s, fits (continuing a checkpoint under resume=auto or resume=<run dir>: lmlab.core.runs), exports
hf/ (the best checkpoint by the stage's metric under export=best), tests the best checkpoint where the stage has a
test split (stage.test), and returns the monitored metric for Hydra sweepers.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from datamodules.sft import SFTDataModule
from datamodules.vision import VisionChatDataModule
from lightning_modules.dpo import build_reference
from lmlab.core.adapters import add_adapters, export_adapted, is_adapted, quantization
from lmlab.core.kernels import apply_kernels
from lmlab.core.models import (
    align_lm_head,
    build_model,
    compile_mode,
    cuda_graphs,
    export_hf,
    has_varlen_attention,
    is_vision_language,
    load_model,
    resolve_hf_dir,
    sdpa_settings,
    sixteen_bit,
)
from lmlab.core.runs import WANDB_TMP, register_resolvers, remove_leftovers, resume_checkpoint
from lmlab.core.tokenizer import configure_tokenizer, load_tokenizer, train_and_save
from lmlab.core.vision import export_processor, image_slots, with_vision
from lmlab.train.callbacks import RunCSVLogger, import_wandb
from lmlab.train.sharding import check_resume, check_sharding, whole_model

log = logging.getLogger("lmlab.train")
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))  # conf/paths: root_dir
register_resolvers()


def get_tokenizer(cfg: DictConfig, datamodule, run_dir: Path):
    """``tokenizer=<dir>``, else init_from's, else a BPE trained on the training text (saved in the run)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from:
        return load_tokenizer(resolve_hf_dir(cfg.init_from))
    saved = run_dir / "tokenizer"
    if saved.is_dir():  # a resumed run keeps the tokenizer it started with
        return load_tokenizer(saved)
    return train_and_save(datamodule, saved, cfg.template.chat_template, cfg.bpe)[0]


def chat_template(cfg: DictConfig, datamodule, tokenizer) -> str | None:
    """The run's chat template. Chat data (SFT, preference) is rendered with its preset's own (``data.chat_template``,
    e.g. a fixed layout), else the template preset's (``template=``; template=tokenizer: the tokenizer's). Other data
    renders no chats: the tokenizer keeps its own template and takes the template preset's only where it has none."""
    if isinstance(datamodule, SFTDataModule):
        return datamodule.own_chat_template or cfg.template.chat_template or tokenizer.chat_template
    return tokenizer.chat_template or cfg.template.chat_template


def prepare_tokenizer(cfg: DictConfig, datamodule, run_dir: Path, classifier: bool):
    """The run's tokenizer, configured once for everything downstream and the export: its chat template
    (:func:`chat_template`) and, for a classifier, its training length (``seq_len``)."""
    tokenizer = get_tokenizer(cfg, datamodule, run_dir)
    return configure_tokenizer(
        tokenizer, chat_template(cfg, datamodule, tokenizer), cfg.seq_len if classifier else None
    )


def loader_settings(cfg: DictConfig) -> dict[str, int | bool]:
    """``num_workers``, ``pad_to_multiple_of`` and ``pin_memory`` (conf/train.yaml), ``auto`` resolved by
    ``trainer.accelerator``.

    On a GPU (``gpu``/``cuda``) 4 loader processes collate while the device computes, batch widths padded to a
    multiple of 64 give the kernels tensor-core-sized shapes and few distinct ones, and batches in pinned (page-locked)
    memory copy to the device without blocking the host; on the CPU, loading in the training process and no padding
    beyond the longest sample cost least, and pinning has nothing to speed up. Packed rows under CUDA graphs
    (``compile=reduce-overhead`` or ``max-autotune``) are padded to a multiple of 256: every distinct width is a graph
    recorded anew, and at 64 a 246M LLaMA's packed SFT recorded so often that it ran at a third of the speed (H200:
    65k real tokens/s against 181k; README "GPU"). A value is taken as it is.
    """
    gpu = on_gpu(cfg)
    multiple = (256 if cfg.packing and cuda_graphs(cfg.compile) else 64) if gpu else 1
    auto = {"num_workers": 4 if gpu else 0, "pad_to_multiple_of": multiple, "pin_memory": gpu}
    settings = {key: value if cfg[key] == "auto" else cfg[key] for key, value in auto.items()}
    for key, value in settings.items():
        if type(value) is not type(auto[key]):  # a quoted 'false' would be a true pin_memory
            raise ValueError(f"{key}={value!r}: give auto or a {type(auto[key]).__name__}")
    return settings


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the run trains on a GPU: ``trainer.accelerator`` gpu or cuda (``auto`` settings key on it)."""
    return cfg.trainer.accelerator in ("gpu", "cuda")


def connect_data(cfg: DictConfig, datamodule, tokenizer) -> None:
    """Hand the datamodule the configured tokenizer and what the run decides: the model's arch, ``seq_len`` (its max
    length), ``batch_size``, ``seed`` (batch order), the loader settings and the chat template. Data presets declare
    none of these (conf/data/schema/), so one preset serves every model, length and machine."""
    datamodule.connect(
        tokenizer,
        arch=cfg.model.arch,
        max_length=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        chat_template=tokenizer.chat_template,  # prepare_tokenizer's choice
        packing=cfg.packing,
        **loader_settings(cfg),
    )


def check_vision(vision_cfg: DictConfig | None, datamodule, model) -> None:
    """Images come together: a vision tower (``vision=``, set by stage=vlm), image chat data and a model that reads
    them. An init_from vision-language run trained by another stage would export without its image processor."""
    if (vision_cfg is not None) != isinstance(datamodule, VisionChatDataModule):
        raise ValueError(
            f"vision={'set' if vision_cfg is not None else 'null'} with data of {type(datamodule).__name__}: image "
            "chats (data=shapes, llava) train with stage=vlm, which sets vision=; other data with the other stages"
        )
    if vision_cfg is None and is_vision_language(model.config):
        raise ValueError("init_from is a vision-language run: train it further with stage=vlm")


def reference_model(cfg: DictConfig, policy) -> dict:
    """``reference_model=`` for a stage whose module compares with a frozen reference (stage.module.reference: DPO),
    built from the starting weights or ``stage.module.ref_from``; nothing for other stages. A ``ref_from`` model's
    LM head is aligned as build_module aligns the policy's (``align_lm_head``), so DPO's fused head pads both alike; a
    copy of the policy, or the policy itself with its adapters off, has the policy's already."""
    if OmegaConf.select(cfg, "stage.module.reference") is None:
        return {}
    reference = build_reference(policy, cfg.stage.module.ref_from)
    if cfg.stage.module.ref_from:
        align_lm_head(reference, cfg.align_lm_head)
    return {"reference_model": reference}


def best_checkpoint(trainer: L.Trainer, monitor: str) -> ModelCheckpoint | None:
    """The callback that kept the best checkpoint by the stage's metric; None when it saved none (no validation)."""
    kept = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]  # not callbacks.preemption
    best = next((c for c in kept if c.monitor == monitor and c.best_model_path), None)
    if best is None:
        log.warning(
            "no best checkpoint by %s was saved (no validation ran?): export and test use the final weights", monitor
        )
    return best


def load_best(module: L.LightningModule, best: ModelCheckpoint) -> None:
    """Load the best checkpoint's weights into ``module``, so the export holds the model the run judged best."""
    ckpt = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"], strict=module.strict_loading)  # QLoRA's hold only what trains
    log.info(
        "export: the best checkpoint by %s, step %d (%s=%.4f): %s",
        best.monitor,
        ckpt["global_step"],
        best.monitor,
        best.best_model_score,
        best.best_model_path,
    )


def exported_model(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, best: ModelCheckpoint | None):
    """The model hf/ gets on rank 0 (None on the others): the best checkpoint's weights under ``export=best``, else the
    final ones. Under trainer=fsdp each rank holds a shard, so every rank must call this: they gather the whole model
    and rank 0 gets a plain copy of it (lmlab.train.sharding.whole_model)."""
    best_path = best.best_model_path if cfg.export == "best" and best else None
    if isinstance(trainer.strategy, FSDPStrategy):
        return whole_model(trainer, module, best_path)
    if not trainer.is_global_zero:
        return None
    if best_path:
        load_best(module, best)
    else:
        log.info("export: the final weights, step %d", trainer.global_step)
    return module.model


def set_allocator(cfg: DictConfig) -> str | None:
    """Hand ``cuda_alloc_conf`` (conf/train.yaml; auto: expandable segments on a GPU) to PyTorch's CUDA allocator
    through ``PYTORCH_CUDA_ALLOC_CONF``; return the settings in force (None: torch's own). The allocator reads them
    once, when the process first uses CUDA, so a setting already in the environment (the shell's, or an earlier run's
    in this process) holds, and one that comes after CUDA started is reported, not applied. Lightning's DDP ranks
    inherit the variable."""
    wanted = cfg.cuda_alloc_conf
    if wanted == "auto":
        wanted = "expandable_segments:True" if on_gpu(cfg) else None
    held = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    if not wanted or held == wanted:
        return held
    if held is not None or torch.cuda.is_initialized():
        log.warning("cuda_alloc_conf=%s not applied: CUDA's allocator runs with %s", wanted, held or "torch's own")
        return held
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = wanted
    return wanted


def train(cfg: DictConfig) -> float | None:
    """One training run in ``paths.output_dir``; returns the monitored metric's final value. SDPA attention follows
    ``cudnn_sdpa`` and ``packed_attention`` for the run and is put back after it (attention)."""
    set_allocator(cfg)
    with attention(cfg):
        return fit_and_export(cfg)


def attention(cfg: DictConfig) -> AbstractContextManager:
    """transformers' sdpa attention as ``cudnn_sdpa`` and ``packed_attention`` (conf/train.yaml) set it, for a block
    (lmlab.core.models.sdpa_settings)."""
    return sdpa_settings(cfg.cudnn_sdpa, varlen=packed_attention(cfg) == "varlen")


def packed_attention(cfg: DictConfig) -> str:
    """``packed_attention`` (conf/train.yaml) resolved: ``auto`` is varlen where it can run (a GPU, 16-bit precision,
    ``model.attn_implementation=sdpa`` and a torch that has the kernel), else mask; an explicit varlen elsewhere is an
    error, here rather than at the first attention call. varlen computes each packed sample's attention alone, where a
    mask makes SDPA compute the whole row's."""
    mode = cfg.packed_attention
    if mode not in ("auto", "varlen", "mask"):
        raise ValueError(f"packed_attention={mode!r}: one of auto, varlen, mask")
    needs = {
        "a GPU (trainer.accelerator gpu or cuda)": on_gpu(cfg),
        "16-bit precision (trainer.precision bf16-mixed, ...)": sixteen_bit(cfg.trainer.precision),
        "model.attn_implementation=sdpa": cfg.model.attn_implementation == "sdpa",
        "torch >= 2.11 (torch.nn.attention.varlen)": has_varlen_attention(),
    }
    missing = [need for need, met in needs.items() if not met]
    if mode == "varlen" and missing:
        raise ValueError(f"packed_attention=varlen needs {', '.join(missing)}; or packed_attention=mask (or auto)")
    return "varlen" if mode == "varlen" or (mode == "auto" and not missing) else "mask"


def build_module(cfg: DictConfig, run_dir: Path) -> tuple[L.LightningModule, Any, Any, Any]:
    """The stage's LightningModule, its datamodule and tokenizer, connected, and a vision-language model's image
    processor (else None), as a run builds them: the model built or loaded, with its vision tower, kernels, aligned
    LM head, adapters and DPO's reference as the config asks. One function for fit_and_export and for the benchmarks
    that time lmlab's runs (benchmarks/dpo_throughput.py), so what they time is what a run trains."""
    labels = OmegaConf.select(cfg, "stage.module.labels")  # a stage with class labels trains a classifier
    datamodule = instantiate(cfg.data)
    tokenizer = prepare_tokenizer(cfg, datamodule, run_dir, classifier=labels is not None)

    peft_cfg = OmegaConf.select(cfg, "peft")
    vision_cfg = OmegaConf.select(cfg, "vision")  # stage=vlm: the vision tower and projector (conf/vision/)
    if vision_cfg is not None and peft_cfg is not None:
        raise ValueError("peft= with stage=vlm is not supported yet: train the parts with stage.module.freeze")
    quantize = quantization(peft_cfg, cfg.init_from)  # QLoRA's 4-bit loading, or None
    model = (
        load_model(cfg.init_from, cfg.model, tokenizer, labels, quantize)
        if cfg.init_from
        else build_model(cfg.model, tokenizer, labels)
    )
    check_vision(vision_cfg, datamodule, model)
    images = None  # a vision-language model's image processor
    if vision_cfg is not None:  # the language model gets eyes (or an init_from vlm run keeps its own)
        model, images = with_vision(model, vision_cfg, tokenizer, cfg.init_from)
    apply_kernels(model, cfg.kernels, cfg.compile)  # Liger's kernels where switched on (CUDA), before any adapters
    align_lm_head(model, cfg.align_lm_head)  # before adapters and the DPO reference's copy, which keep its class
    connect_data(cfg, datamodule, tokenizer)
    if images is not None:
        datamodule.connect_images(*image_slots(model, tokenizer), images)
    if peft_cfg is not None:  # LoRA (QLoRA: on the 4-bit base); a classifier's head trains with it
        model = add_adapters(model, peft_cfg)
    # plain containers: checkpoints then load with torch.load(weights_only=True)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = instantiate(
        cfg.stage.module, model=model, optim=optim, **reference_model(cfg, model), _recursive_=False, _convert_="all"
    )
    return module, datamodule, tokenizer, images


def fit_and_export(cfg: DictConfig) -> float | None:
    """train()'s run: fit, export hf/ (rank 0), test the best checkpoint if the stage asks."""
    if cfg.export not in ("best", "last"):
        raise ValueError(f"export must be 'best' or 'last', got {cfg.export!r}")
    compile_mode(cfg.compile)  # an unknown mode fails here, before anything is built
    if cuda_graphs(cfg.compile) and cfg.trainer.accumulate_grad_batches > 1:
        # a replayed backward hands .grad the graph's own output, which the next micro-batch's replay takes back:
        # torch stops at the second backward (gradient accumulation into a CUDA graph's output)
        raise ValueError(
            f"compile={cfg.compile} (CUDA graphs) does not accumulate gradients over micro-batches: set "
            f"trainer.accumulate_grad_batches=1 (got {cfg.trainer.accumulate_grad_batches}) or compile=true"
        )
    check_sharding(cfg)  # trainer=fsdp: refuse what cannot run sharded yet, before anything is built
    run_dir = Path(cfg.paths.output_dir)
    resume = resume_checkpoint(cfg, run_dir)  # (checkpoint, its step) or None; it logs what it found
    if resume:
        check_resume(resume[0], cfg)
        remove_leftovers(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")

    module, datamodule, tokenizer, images = build_module(cfg, run_dir)

    loggers = [instantiate(c) for c in cfg.logger.values()]
    for lg in loggers:
        if resume and isinstance(lg, RunCSVLogger):
            lg.resume_from(resume[1])
        if isinstance(lg, WandbLogger):
            import_wandb(run_dir / WANDB_TMP)
    callbacks = [cb for cb in (instantiate(c) for c in cfg.callbacks.values()) if cb is not None]  # None: off
    if cfg.trainer.get("enable_progress_bar", True) is False:  # Lightning's switch turns callbacks.progress off: it
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]  # refuses a bar callback with it off
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume[0]) if resume else None)
    best = best_checkpoint(trainer, cfg.stage.monitor)
    exported = exported_model(cfg, trainer, module, best)
    if trainer.is_global_zero:
        if is_adapted(exported):
            labels = OmegaConf.select(cfg, "stage.module.labels")
            unquantized = partial(load_model, cfg.init_from, cfg.model, tokenizer, labels)  # QLoRA's base
            exported = export_adapted(exported, run_dir / "adapter", unquantized)
        export_hf(exported, tokenizer, run_dir / "hf")
        if images is not None:  # AutoProcessor then loads the images' processing with the tokenizer
            export_processor(exported, tokenizer, images, run_dir / "hf")
        log.info("data: %s", datamodule.skips.report())
    if cfg.stage.test:  # on the best checkpoint, which then stays loaded
        trainer.test(module, datamodule=datamodule, ckpt_path=best.best_model_path if best else None)
    metric = trainer.callback_metrics.get(cfg.stage.monitor)
    log.info("run folder: %s", run_dir)
    return None if metric is None else float(metric)


def run(cfg: DictConfig) -> float | None:
    """One Hydra job: train, and always close the wandb run so multirun jobs stay separate runs."""
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return train(cfg)
    finally:
        wandb = sys.modules.get("wandb")  # imported only when a wandb logger was used
        if wandb is not None:
            wandb.finish()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
